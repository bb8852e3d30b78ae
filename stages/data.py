"""Data stage: curate the sources (`data.sources`; none configured: the synthetic source, rendered at every rung's
resolution into aspect-ratio buckets) through the funnel (data/curate.py) on every core: operators, duplicate
checks, caption embeddings from the frozen text encoder, WebDataset shards (image, caption, text embeddings) + the
empty-caption embedding. VAE latents are added by the `latents` stage once a VAE exists (trained or pretrained).
Every run logs its funnel report (a table, example thumbnails of what each operator dropped) and the curated set as
an MLflow dataset input."""

from __future__ import annotations

import json
from pathlib import Path

from data.shards import read_manifest, split_hash
from kiln.stage_io import StageResult
from kiln.text_encoder import build_text_encoder
from stages.common import pick_device, save_uncond, write_json


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    from data.curate import curate

    out_dir = Path(out_dir)
    # On the CPU: the curation workers embed the captions with it (forked, they share this one copy).
    encoder = build_text_encoder(cfg.text_encoder)
    funnel = curate(cfg, out_dir / "shards", encoder, scorer=_alignment_scorer(cfg))
    null_emb, null_mask = encoder([cfg.sampler.negative_prompt])
    save_uncond(out_dir / "uncond.safetensors", null_emb[0], null_mask[0])
    manifest = read_manifest(out_dir / "shards")
    report = funnel.report()
    write_json(out_dir / "funnel_report.json", report)
    check_ladder(cfg, manifest)
    grid = funnel.example_grid()
    if grid is not None:
        grid.save(out_dir / "funnel_examples.png")
        tracker.log_image(grid, key="funnel_examples")
    tracker.log_table([{k: _cell(v) for k, v in row.items()} for row in report["operators"]], "funnel.json")
    tracker.log_dict(report, "funnel_report.json")
    tracker.log_dataset(manifest, out_dir / "shards", name=f"{cfg.name}-curated")
    metrics = {"samples": manifest["count"], "funnel/seen": report["seen"], "funnel/kept": report["kept"],
               "funnel/failed_sources": len(report["failed_sources"]),
               **{f"funnel/dropped_{row['operator']}": row["dropped"] for row in report["operators"]},
               **{f"funnel/converted_{name.replace(' ', '_')}": n for name, n in report["conversions"].items()}}
    tracker.log_metrics(metrics)
    tracker.log_dict(manifest, "shards_manifest.json")
    if (out_dir / "heldout" / "manifest.json").exists():
        held = json.loads((out_dir / "heldout" / "manifest.json").read_text())["count"]
        if held < 2:  # the evaluation's distances and pairs need images
            raise ValueError(f"data: the held-out split has {held} of {report['kept']} images (data.heldout_fraction "
                             f"{cfg.data.heldout_fraction}): raise it, or bring more images")
        metrics["heldout_samples"] = held
    return StageResult("data", out_dir, metrics, split_hash(out_dir))


def images_per_rung(cfg, manifest: dict) -> dict[int, int]:
    """{rung resolution: curated images in its buckets}."""
    from data.buckets import buckets_for

    return {rung.resolution: sum(manifest["buckets"].get(f"{w}x{h}", {}).get("count", 0)
                                 for w, h in buckets_for(rung.resolution, cfg.data.aspect_ratios,
                                                         cfg.data.bucket_multiple))
            for rung in cfg.train.rungs}


def check_ladder(cfg, manifest: dict) -> None:
    """A one-line error, before the VAE or any training, for a rung the curated images cannot fill a batch of: an
    image enters a rung only if its shorter side is at least data.funnel.min_side_fraction x the rung's resolution
    (no upsampling by default), so small images leave the high rungs empty, which pretrain would find only after
    the VAE and every lower rung had trained. The same for SFT's subset of your images (task captions), which the
    SFT stage would find only after pretraining."""
    counts = images_per_rung(cfg, manifest)
    short = [rung for rung in cfg.train.rungs if counts[rung.resolution] < rung.batch_size]
    if short:
        fraction = cfg.data.funnel.min_side_fraction
        filled = [r for r in cfg.train.rungs if r not in short]
        raise ValueError(
            "data: the curated images cannot fill " + ", ".join(
                f"the {r.resolution} px rung ({counts[r.resolution]} images < batch {r.batch_size})" for r in short)
            + f"; an image joins a rung when its shorter side is >= {fraction:g} x the rung's resolution; "
            + (f"keep the rungs it fills (--set 'train.rungs={_rungs_flag(filled)}')" if filled else
               "use larger images")
            + " or lower data.funnel.min_side_fraction (smaller images are then upsampled)")
    last = cfg.train.rungs[-1].resolution
    subset = max(1, round(cfg.sft.top_fraction * counts[last]))
    if cfg.task_kind == "captions" and "sft" in cfg.post_training and subset < cfg.sft.batch_size:
        raise ValueError(f"data: sft would train on {subset} images (sft.top_fraction {cfg.sft.top_fraction:g} of "
                         f"{counts[last]} at {last} px), fewer than sft.batch_size {cfg.sft.batch_size}: raise "
                         f"sft.top_fraction or lower sft.batch_size")


def _rungs_flag(rungs) -> str:
    return "[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in r.model_dump().items() if v is not None) + "}"
                           for r in rungs) + "]"


def _cell(value):
    """A report value as one table cell: lists joined, {cause: count} as "cause: count; ..."."""
    if isinstance(value, list):
        return "; ".join(value)
    if isinstance(value, dict):
        return "; ".join(f"{key}: {count}" for key, count in value.items())
    return value


def _alignment_scorer(cfg):
    """The funnel's text-image scorer: the reward stage's model named by data.funnel.alignment_model, or None."""
    if not cfg.data.funnel.alignment_model:
        return None
    from reward.scoring import make_scorer

    score = make_scorer(cfg, {"reward_model": 1.0}, cfg.data.funnel.alignment_model, pick_device(cfg.device))
    return lambda images, captions: score(images, captions)[0].tolist()
