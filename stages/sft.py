"""SFT stage: fine-tune the last pretrain rung on a high-quality subset chosen by stricter curation settings.

For the synthetic source "high quality" means clean, centred and well separated: every object's bounding square
lies inside the image's central region and objects keep a wide gap, with single, count and relation scenes in
equal numbers. For your own images (task captions) it is the top sft.top_fraction by a score the funnel computed
(sft.select_by: clarity, entropy, saturation, luma) or by your own column (quality: the source's quality_column). The subset is written as shards of its own (the same latents, no re-encoding) and trained with the
pretrain rung's model and loss step (kiln/trainer.py's loop) at the last rung's resolution, a lower learning rate, starting from that rung's weights.
"""

from __future__ import annotations

import random
from pathlib import Path

from data.buckets import buckets_for
from data.shards import ShardWriter, iter_samples, read_manifest
from kiln import distributed
from kiln.config import RungConfig
from kiln.stage_io import StageResult, hash_files
from stages.common import starting_weights
from stages.pretrain import Rung


def _apart(a: list[float], b: list[float], gap: float) -> bool:
    """Boxes [x0, y0, x1, y1] are at least `gap` apart along some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def is_curated(meta: dict, centre_margin: float, min_gap: float) -> bool:
    """Whether a sample passes the SFT curation: needs meta["objects"] (boxes in image fractions)."""
    boxes = meta.get("objects")
    if not boxes:
        return False
    inside = all(x0 >= centre_margin and y0 >= centre_margin and x1 <= 1 - centre_margin and y1 <= 1 - centre_margin
                 for x0, y0, x1, y1 in boxes)
    separated = all(_apart(a, b, min_gap) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    return inside and separated


def select(metas, scfg, seed: int) -> set[str]:
    """Keys of the curated samples of sft.kinds among (key, meta) pairs; kinds balanced (downsampled at random to
    the rarest kind) when asked."""
    by_kind: dict[str, list[str]] = {}
    for key, meta in metas:
        if meta.get("kind", "?") in scfg.kinds and is_curated(meta, scfg.centre_margin, scfg.min_gap):
            by_kind.setdefault(meta.get("kind", "?"), []).append(key)
    if scfg.balance_kinds and by_kind:
        rng = random.Random(seed)
        n = min(len(keys) for keys in by_kind.values())
        by_kind = {kind: rng.sample(keys, n) for kind, keys in sorted(by_kind.items())}
    return {key for keys in by_kind.values() for key in keys}


def select_top(metas, scfg) -> set[str]:
    """Task captions: keys of the top sft.top_fraction of (key, meta) pairs by meta[sft.select_by] (a score the
    funnel computed, or a source's quality column); samples without the score are never chosen."""
    scored = sorted(((meta[scfg.select_by], key) for key, meta in metas if meta.get(scfg.select_by) is not None),
                    reverse=True)
    if not scored:
        raise ValueError(f"sft: no sample has a {scfg.select_by!r} score (for quality: set the source's "
                         f"quality_column)")
    return {key for _, key in scored[:max(1, round(scfg.top_fraction * len(metas)))]}


def write_subset(cfg, latents_dir: Path, out_dir: Path) -> dict:
    """Write the curated subset of the latents shards at the last rung's resolution to out_dir/shards. Two
    streaming passes (choose keys from the metadata, then copy), so memory does not grow with the dataset."""
    resolution = cfg.train.rungs[-1].resolution
    buckets = buckets_for(resolution, cfg.data.aspect_ratios, cfg.data.bucket_multiple)
    available = set(read_manifest(latents_dir / "shards")["buckets"])
    buckets = [b for b in buckets if f"{b[0]}x{b[1]}" in available]
    metas = [(s["key"], s["meta"]) for s in iter_samples(latents_dir / "shards", buckets=buckets, load_images=False)]
    chosen = select_top(metas, cfg.sft) if cfg.task_kind == "captions" else select(metas, cfg.sft, cfg.seed)
    if len(chosen) < cfg.sft.batch_size:
        raise ValueError(f"sft: only {len(chosen)} of {len(metas)} samples at {resolution}px pass curation "
                         f"(sft.centre_margin={cfg.sft.centre_margin}, sft.min_gap={cfg.sft.min_gap}), fewer than "
                         f"sft.batch_size={cfg.sft.batch_size}: loosen them or render more data")
    kinds: dict[str, int] = {}
    with ShardWriter(out_dir / "shards", max_samples_per_shard=cfg.data.max_samples_per_shard) as writer:
        for sample in iter_samples(latents_dir / "shards", buckets=buckets, load_images=False):
            if sample["key"] not in chosen:
                continue
            writer.write(bucket=tuple(sample["bucket"]), key=sample["key"], caption=sample["caption"],
                         tensors={name: sample[name] for name in ("latents", "text_emb", "text_mask")},
                         meta=sample["meta"])
            kind = sample["meta"].get("kind", "?")
            kinds[kind] = kinds.get(kind, 0) + 1
    (out_dir / "uncond.safetensors").write_bytes((latents_dir / "uncond.safetensors").read_bytes())
    return {"sft/candidates": len(metas), "sft/selected": len(chosen), **{f"sft/selected_{k}": v for k, v in kinds.items()}}


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir = Path(out_dir)
    if distributed.ranks().is_main and not (out_dir / "shards" / "manifest.json").exists():  # a resumed stage keeps its subset
        tracker.log_metrics(write_subset(cfg, Path(inputs["latents"]), out_dir))
    distributed.barrier()  # under torchrun the other processes read the subset rank 0 wrote
    scfg = cfg.sft
    rung = RungConfig(resolution=cfg.train.rungs[-1].resolution, steps=scfg.steps, batch_size=scfg.batch_size,
                      lr=scfg.lr)
    # The SFT rung is one past the ladder: its own seed stream, the pretrain rung's model and loss step.
    stage = Rung(cfg, rung, len(cfg.train.rungs), out_dir, out_dir, tracker, f"sft {rung.resolution}px", "sft",
                 starting_weights(cfg, inputs))
    last_loss = stage.train(inputs)
    metrics = {"final_loss": last_loss, "steps": stage.trainer.step}
    return StageResult("sft", out_dir, metrics, hash_files(out_dir / "checkpoints"))
