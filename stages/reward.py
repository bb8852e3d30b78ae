"""Reward stage: train the learned reward model (reward/model.py) on the preference data with the Bradley-Terry
loss, and report its pairwise accuracy against the judge on prompts it never trained on.

Each preference record holds every judged image of one prompt with its score; every two images of a prompt with
different scores make a training pair (best against worst is only one of them). Records, not pairs, are split into
training and validation, so no validation prompt is seen in training. With `reward.data_pairs`, training also gets
pairs from the rendered training data: a caption's own image against another scene's image, ordered by the verifier
(a hundred generated prompts are few to learn "does this image show this caption" from; the data has thousands).
Validation stays on the generated samples only. The loop is kiln/trainer.py's (checkpoints every
cadence.checkpoint_every steps and on SIGTERM; a rerun resumes from the latest).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from data.shards import iter_samples, pad_and_stack
from kiln.checkpoint import save_network
from kiln.stage_io import StageResult, hash_files
from kiln.trainer import Schedule, Trainer
from reward.model import RewardModel, bradley_terry_loss, pairwise_accuracy
from stages.common import pick_device


def _records(pairs_dir: Path):
    """All records: images uint8 (N, K, 3, H, W), scores (N, K), and each record's (text_emb (L, D), text_mask (L,))."""
    samples = list(iter_samples(pairs_dir / "shards", load_images=False))
    if not samples:
        raise ValueError(f"reward: no preference records in {pairs_dir}")
    k = min(s["images"].shape[0] for s in samples)  # labelled pairs: 2; sampled: preference.samples_per_prompt
    images = torch.stack([s["images"][:k] for s in samples])
    scores = torch.stack([s["scores"][:k].float() for s in samples])
    return images, scores, [(s["text_emb"].float(), s["text_mask"].bool()) for s in samples]


def data_records(data_dir: Path, resolution: int, n: int, seed: int, synthetic: bool = True):
    """Up to n records (images uint8 (n, 2, 3, H, W), scores (n, 2), [(text_emb, text_mask)]) from the data stage's square
    images at `resolution`: each caption's own image and the next sample's image, scored by the verifier (pairs it
    cannot order are dropped); for captioned images (synthetic False) the caption's own image is the better one."""
    from data.synthetic import parse_caption
    from reward.verifier import score

    samples = []
    for sample in iter_samples(data_dir / "shards", buckets=[(resolution, resolution)], load_images=True):
        if synthetic and not parse_caption(sample["caption"]).verifiable():  # data.extra_colours/shapes: unscorable
            continue
        samples.append(sample)
        if len(samples) > n:
            break
    if len(samples) < 2:
        raise ValueError(f"reward: reward.data_pairs needs {resolution}x{resolution} images in {data_dir}")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    images, scores, texts = [], [], []
    for a, b in zip(order, order[1:] + order[:1]):
        own, other = samples[a], samples[b]
        pair_scores = torch.tensor([score(own["image"], own["caption"]), score(other["image"], own["caption"])]) \
            if synthetic else torch.tensor([1.0, float(other["caption"] == own["caption"])])
        if pair_scores[0] == pair_scores[1]:
            continue
        images.append(torch.stack([torch.from_numpy(np.array(s["image"].convert("RGB"))).permute(2, 0, 1)
                                   for s in (own, other)]))
        scores.append(pair_scores)
        texts.append((own["text_emb"].float(), own["text_mask"].bool()))
    return torch.stack(images)[:n], torch.stack(scores)[:n], texts[:n]


def ordered_pairs(scores: torch.Tensor, records: torch.Tensor) -> torch.Tensor:
    """(P, 3) rows (record, better image, worse image) for every two images of a record with different scores."""
    rows = []
    for r in records.tolist():
        s = scores[r]
        rows += [(r, i, j) for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]]
    return torch.tensor(rows, dtype=torch.long).view(-1, 3)


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    rcfg = cfg.reward
    images, scores, texts = _records(Path(inputs["pairs"]))
    n = images.shape[0]
    generator = torch.Generator().manual_seed(cfg.seed)
    # Only records whose images score differently hold pairs: split those, so a few tied prompts cannot leave the
    # validation split empty while others teach.
    informative = torch.nonzero(scores.amax(dim=1) > scores.amin(dim=1)).flatten()  # (I,) record indices
    order = informative[torch.randperm(len(informative), generator=generator)]
    n_val = max(1, round(rcfg.val_fraction * len(order))) if len(order) >= 2 else 0
    val, train = ordered_pairs(scores, order[:n_val]), ordered_pairs(scores, order[n_val:])
    n_data = 0
    if rcfg.data_pairs:
        if not inputs.get("data"):
            raise ValueError("reward: reward.data_pairs needs the data stage's output as input 'data'")
        extra = data_records(Path(inputs["data"]), images.shape[-1], rcfg.data_pairs, cfg.seed,
                             synthetic=cfg.task_kind == "synthetic")
        n_data = extra[0].shape[0]
        # Data records hold 2 images; they go after the generated records in the same K slots, the unused slots
        # scored NaN (NaN compares false, so those slots are never paired).
        k = images.shape[1]
        data_images = torch.zeros(n_data, k, *images.shape[2:], dtype=images.dtype)
        data_images[:, :2] = extra[0]
        data_scores = torch.full((n_data, k), float("nan"))
        data_scores[:, :2] = extra[1]
        texts = texts + extra[2]
        data_rows = ordered_pairs(data_scores, torch.arange(n_data))
        data_rows[:, 0] += n  # stored after the generated records
        train = torch.cat([train, data_rows])
        images, scores = torch.cat([images, data_images]), torch.cat([scores, data_scores])
    if len(train) == 0:
        raise ValueError(f"reward: no differently scored images among the {n} prompts' records in {inputs['pairs']}"
                         + (" nor in the data pairs" if rcfg.data_pairs else ""))
    if len(val) == 0:
        print(f"reward: warning: only {len(order)} of the {n} prompts' records score their images differently: no "
              f"validation pairs, reward/val_accuracy is NaN", flush=True)
    text = pad_and_stack([emb for emb, _ in texts])  # (N, L, D), right-padded
    mask = pad_and_stack([m for _, m in texts])  # (N, L)

    def batch(rows: torch.Tensor):
        """(2B, 3, H, W) in [-1, 1], better images first; text and mask repeated to match."""
        pixels = torch.cat([images[rows[:, 0], rows[:, 1]], images[rows[:, 0], rows[:, 2]]]).float() / 127.5 - 1
        return pixels.to(device), text[rows[:, 0]].repeat(2, 1, 1).to(device), mask[rows[:, 0]].repeat(2, 1).to(device)

    torch.manual_seed(cfg.seed)
    model = RewardModel(text.shape[-1], tuple(rcfg.channels), rcfg.hidden)
    trainer = Trainer("reward", model, cfg, steps=rcfg.steps, lr=rcfg.lr, schedule=Schedule(decay="constant"),
                      out_dir=out_dir, tracker=tracker, device=device, weight_decay=0.01, grad_clip=1.0,
                      state={"generator": generator}, meta={"kind": "reward"}, postfix=("loss", "accuracy"))
    trainer.start()

    def batches():
        while True:
            yield train[torch.randint(len(train), (min(rcfg.batch_size, len(train)),), generator=generator)]

    def forward_backward(rows: torch.Tensor) -> dict:
        r_chosen, r_rejected = model(*batch(rows)).chunk(2)
        loss = bradley_terry_loss(r_chosen, r_rejected)
        loss.backward()
        return {"loss": loss.detach(), "accuracy": pairwise_accuracy(r_chosen, r_rejected)}

    trainer.fit(forward_backward, batches, save_final=False)

    model.eval()
    with torch.no_grad():
        def accuracy_on(rows):
            if len(rows) == 0:
                return float("nan")
            return pairwise_accuracy(*torch.cat([model(*batch(rows[i : i + 256])).view(2, -1)
                                                 for i in range(0, len(rows), 256)], dim=1))

        metrics = {"reward/val_accuracy": accuracy_on(val), "reward/train_accuracy": accuracy_on(train),
                   "reward/pairs_train": len(train), "reward/pairs_val": len(val),
                   "reward/prompts_train": len(order) - n_val, "reward/prompts_val": n_val, "reward/data_pairs": n_data}
    tracker.log_metrics(metrics)
    save_network(out_dir, "reward_model", model,
                 {"text_dim": text.shape[-1], "channels": list(rcfg.channels), "hidden": rcfg.hidden})
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # done: the model above is the stage's output
    return StageResult("reward", out_dir, metrics, hash_files(out_dir, "reward_model.*"))
