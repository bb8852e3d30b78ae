"""Features stage: train the feature network of the Frechet distance (kiln/features.py) on the data stage's real
images, labelled by parsing their captions, and report how well it names held-back images' contents (a feature
network that cannot tell scenes apart would make the distance meaningless)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from data.labels import LABEL_SIZES, scene_labels
from data.shards import iter_samples
from data.synthetic import parse_caption
from kiln.checkpoint import load_network, save_network
from kiln.features import SIZE, FeatureNet
from kiln.images import image_tensor
from kiln.stage_io import StageResult, hash_files
from kiln.trainer import Schedule, Trainer
from stages.common import pick_device


def load_feature_net(features_dir: Path, device="cpu") -> FeatureNet:
    """A features stage's output folder -> the trained FeatureNet (eval mode, frozen)."""
    return load_network(features_dir, "feature_net", lambda arch: FeatureNet(arch["dim"], *LABEL_SIZES), "features",
                        device)


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir, fcfg = Path(out_dir), cfg.features
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    images, present, objects, kinds = [], [], [], []
    for sample in iter_samples(Path(inputs["data"]) / "shards", load_images=True):
        labels = scene_labels(parse_caption(sample["caption"]))
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
    trainer = Trainer("features", net, cfg, steps=fcfg.steps, lr=fcfg.lr, schedule=Schedule(decay="constant"),
                      out_dir=out_dir, tracker=tracker, device=device, weight_decay=0.01, grad_clip=1.0,
                      state={"generator": generator}, meta={"kind": "features"}, log_prefix="features")
    trainer.start()

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
    save_network(out_dir, "feature_net", net, {"dim": fcfg.dim})
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # done: the network above is the stage's output
    metrics = {"features/val_all_right": val_right.item(), "features/val_images": n_val}
    tracker.log_metrics(metrics)
    return StageResult("features", out_dir, metrics, hash_files(out_dir, "feature_net.*"))
