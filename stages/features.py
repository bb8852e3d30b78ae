"""Features stage: train the feature network of the Frechet distance on the data stage's real images, and report how
well it does on images it did not train on (a feature network that cannot tell images apart would make the distance
meaningless).

Task synthetic: a classifier of scene contents (kiln/features.py), labelled by parsing the captions.
Task captions: a contrastive scorer (kiln/contrastive.py) on the training split's images and captions; its held-out
retrieval accuracy (each held-out image's caption among all held-out captions) is reported with its chance level.
It is also the evaluation's text-image alignment judge."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from data.labels import LABEL_SIZES, scene_labels
from data.shards import iter_samples
from data.synthetic import parse_caption
from kiln.checkpoint import save_network
from kiln.contrastive import ContrastiveScorer, alignment, retrieval_accuracy
from kiln.features import SIZE, FeatureNet
from kiln.images import image_tensor
from kiln.stage_io import StageResult, hash_files
from kiln.trainer import Schedule, Trainer
from stages.common import pick_device


def padded_text(samples: list[dict], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard samples' variable-length caption embeddings -> (N, length, D) float, (N, length) bool."""
    dim = samples[0]["text_emb"].shape[-1]
    text, mask = torch.zeros(len(samples), length, dim), torch.zeros(len(samples), length, dtype=torch.bool)
    for i, sample in enumerate(samples):
        n = min(length, len(sample["text_mask"]))
        text[i, :n], mask[i, :n] = sample["text_emb"][:n].float(), sample["text_mask"][:n].bool()
    return text, mask


def shuffled(samples: list[dict], seed: int) -> list[dict]:
    """Samples in a seeded order that does not depend on how the shards are ordered (by bucket, then by the source's
    order, e.g. emoji by code point): their first N are a fair sample of the set."""
    import hashlib

    return sorted(samples, key=lambda s: hashlib.sha256(f"{seed}:{s['key']}".encode()).digest())


def one_per_image(shard_dir: Path, load_images: bool | str = True) -> list[dict]:
    """Each curated image once (its first, smallest-resolution sample): shards hold one sample per rung it fills.
    load_images as data.shards.iter_samples takes it ("png": the stored bytes, undecoded)."""
    seen, out = set(), []
    for sample in iter_samples(shard_dir, load_images=load_images):
        if sample["meta"].get("source_key") not in seen:
            seen.add(sample["meta"].get("source_key"))
            out.append(sample)
    return out


def feature_trainer(cfg, net, out_dir: Path, tracker, device, generator) -> Trainer:
    """The stage's training loop (kiln/trainer.py: resumable checkpoints), started."""
    fcfg = cfg.features
    trainer = Trainer("features", net, cfg, steps=fcfg.steps, lr=fcfg.lr, schedule=Schedule(decay="constant"),
                      out_dir=out_dir, tracker=tracker, device=device, weight_decay=0.01, grad_clip=1.0,
                      state={"generator": generator}, meta={"kind": "features"}, log_prefix="features")
    trainer.start()
    return trainer


def finish(out_dir: Path, net, arch: dict, metrics: dict, tracker) -> StageResult:
    """Save the trained network as the stage's output (its checkpoints go), log the metrics."""
    save_network(out_dir, "feature_net", net, arch)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # done: the network above is the stage's output
    tracker.log_metrics(metrics)
    return StageResult("features", out_dir, metrics, hash_files(out_dir, "feature_net.*"))


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    if cfg.task_kind == "captions":
        return run_contrastive(cfg, inputs, out_dir, tracker)
    out_dir, fcfg = Path(out_dir), cfg.features
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    images, present, objects, kinds = [], [], [], []
    for sample in iter_samples(Path(inputs["data"]) / "shards", load_images=True):
        spec = parse_caption(sample["caption"])
        if not spec.verifiable():  # a training-only extra colour or shape has no label (data.extra_*)
            continue
        labels = scene_labels(spec)
        images.append(image_tensor(sample["image"].resize((SIZE, SIZE))))  # FeatureNet's input size
        present.append(labels[0])
        objects.append(labels[1])
        kinds.append(labels[2])
    images, present = torch.stack(images), torch.stack(present)  # (N, 3, 64, 64), (N, pairs)
    objects, kinds = torch.tensor(objects), torch.tensor(kinds)
    order = torch.randperm(len(images))
    n_val = max(1, int(len(images) * fcfg.val_fraction))
    val, train = order[:n_val], order[n_val:]

    net = FeatureNet(fcfg.dim, *LABEL_SIZES)
    generator = torch.Generator().manual_seed(cfg.seed)
    trainer = feature_trainer(cfg, net, out_dir, tracker, device, generator)

    def batches():
        while True:
            yield train[torch.randint(len(train), (fcfg.batch_size,), generator=generator)]

    def forward_backward(rows: torch.Tensor) -> dict:
        loss, right = net.loss(images[rows].to(device), present[rows].to(device), objects[rows].to(device),
                               kinds[rows].to(device))
        loss.backward()
        return {"loss": loss.detach(), "train_all_right": right.detach()}

    trainer.fit(forward_backward, batches, save_final=False)
    net.eval()
    with torch.no_grad():
        _, val_right = net.loss(images[val].to(device), present[val].to(device), objects[val].to(device),
                                kinds[val].to(device))
    metrics = {"features/val_all_right": val_right.item(), "features/val_images": n_val}
    return finish(out_dir, net, {"dim": fcfg.dim}, metrics, tracker)


def run_contrastive(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    """Task captions: the contrastive scorer, trained on the training split, measured on the held-out split."""
    out_dir, fcfg = Path(out_dir), cfg.features
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = Path(inputs["data"])
    if not (data / "heldout" / "manifest.json").exists():
        raise ValueError(f"features: {data} has no held-out split (data.heldout_fraction is 0): the scorer is "
                         f"measured on it")
    train, heldout = one_per_image(data / "shards"), one_per_image(data / "heldout")
    length = cfg.text_encoder.max_length
    images = torch.stack([image_tensor(s["image"].resize((SIZE, SIZE))) for s in train])  # (N, 3, 64, 64)
    text, mask = padded_text(train, length)  # (N, L, D), (N, L)
    net = ContrastiveScorer(text.shape[-1], fcfg.dim)
    generator = torch.Generator().manual_seed(cfg.seed)
    trainer = feature_trainer(cfg, net, out_dir, tracker, device, generator)

    def batches():
        while True:  # distinct images per batch: a repeated image would be its own negative
            yield torch.randperm(len(train), generator=generator)[:fcfg.batch_size]

    def forward_backward(rows: torch.Tensor) -> dict:
        loss, right = net.loss(images[rows].to(device), text[rows].to(device), mask[rows].to(device))
        loss.backward()
        return {"loss": loss.detach(), "train_top1": right.detach()}

    trainer.fit(forward_backward, batches, save_final=False)
    net.eval()
    held_images = torch.stack([image_tensor(s["image"].resize((SIZE, SIZE))) for s in heldout]).to(device)
    held_text, held_mask = (t.to(device) for t in padded_text(heldout, length))
    captions = [s["caption"] for s in heldout]
    metrics = {"features/heldout_retrieval": retrieval_accuracy(net, held_images, held_text, held_mask, captions),
               "features/heldout_retrieval_chance": 1 / len(set(captions)),
               "features/heldout_alignment": alignment(net, held_images, held_text, held_mask).mean().item(),
               "features/heldout_images": len(heldout), "features/train_images": len(train)}
    return finish(out_dir, net, {"kind": "contrastive", "text_dim": text.shape[-1], "dim": fcfg.dim}, metrics, tracker)
