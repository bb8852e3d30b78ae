"""Data stage: render the synthetic source at every rung's resolution into aspect-ratio buckets, or, with
`data.sources`, curate those sources through the funnel (data/curate.py); embed captions with the frozen text
encoder and write WebDataset shards (image, caption, text embeddings) + the empty-caption embedding. VAE latents are
added by the `latents` stage once a VAE exists (trained or pretrained). A curation run logs its funnel report (a
table, example thumbnails of what each operator dropped) and the curated set as an MLflow dataset input."""

from __future__ import annotations

import random
from pathlib import Path

from tqdm.auto import tqdm

from data.buckets import buckets_for
from data.shards import ShardWriter, read_manifest
from data.synthetic import caption, make_holdout, render, sample_spec
from kiln.stage_io import StageResult
from kiln.text_encoder import build_text_encoder
from stages.common import pick_device, save_uncond, write_json

EMBED_BATCH = 256


def object_boxes(placed, width: int, height: int) -> list[list[float]]:
    """Each object's bounding square as [x0, y0, x1, y1] in fractions of the image (curation reads these)."""
    boxes = []
    for obj in placed:
        half = obj.size / 2
        boxes.append([round((obj.cx - half) / width, 4), round((obj.cy - half) / height, 4),
                      round((obj.cx + half) / width, 4), round((obj.cy + half) / height, 4)])
    return boxes


def _resolutions(cfg) -> list[int]:
    return sorted({r.resolution for r in cfg.train.rungs})


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    encoder = build_text_encoder(cfg.text_encoder, device)
    if cfg.data.sources:
        return _curated(cfg, out_dir, encoder, tracker)
    holdout = make_holdout(cfg.data.holdout_seed)
    rng = random.Random(cfg.seed)
    counts: dict[str, int] = {}

    with ShardWriter(out_dir / "shards", max_samples_per_shard=cfg.data.max_samples_per_shard) as writer:
        for resolution in _resolutions(cfg):
            buckets = buckets_for(resolution, cfg.data.aspect_ratios, cfg.data.bucket_multiple)
            n = cfg.data.samples_per_resolution
            bar = tqdm(total=n, desc=f"data {resolution}px", unit="img")
            for start in range(0, n, EMBED_BATCH):
                specs = [sample_spec(rng, holdout, "train") for _ in range(min(EMBED_BATCH, n - start))]
                captions = [caption(spec, rng) for spec in specs]
                emb, mask = encoder(captions)  # (B, L, D), (B, L)
                for i, (spec, text) in enumerate(zip(specs, captions)):
                    width, height = buckets[rng.randrange(len(buckets))]
                    image, placed = render(spec, width, height, rng)
                    length = int(mask[i].sum())
                    writer.write(
                        bucket=(width, height),
                        key=f"r{resolution}-{start + i:07d}",
                        caption=text,
                        image=image,
                        tensors={"text_emb": emb[i, :length].half().cpu().numpy(),
                                 "text_mask": mask[i, :length].cpu().numpy()},
                        meta={"kind": spec.kind, "resolution": resolution, "objects": object_boxes(placed, width, height)},
                    )
                    counts[spec.kind] = counts.get(spec.kind, 0) + 1
                bar.update(len(specs))
            bar.close()

    null_emb, null_mask = encoder([cfg.sampler.negative_prompt])
    save_uncond(out_dir / "uncond.safetensors", null_emb[0], null_mask[0])
    manifest = read_manifest(out_dir / "shards")
    metrics = {"samples": manifest["count"], **{f"samples_{k}": v for k, v in counts.items()}}
    tracker.log_metrics(metrics)
    tracker.log_dict(manifest, "shards_manifest.json")
    return StageResult("data", out_dir, metrics, manifest["content_hash"])


def _curated(cfg, out_dir: Path, encoder, tracker) -> StageResult:
    from data.curate import curate

    funnel = curate(cfg, out_dir / "shards", encoder, scorer=_alignment_scorer(cfg))
    null_emb, null_mask = encoder([cfg.sampler.negative_prompt])
    save_uncond(out_dir / "uncond.safetensors", null_emb[0], null_mask[0])
    manifest = read_manifest(out_dir / "shards")
    report = funnel.report()
    write_json(out_dir / "funnel_report.json", report)
    grid = funnel.example_grid()
    if grid is not None:
        grid.save(out_dir / "funnel_examples.png")
        tracker.log_image(grid, key="funnel_examples")
    tracker.log_table([{k: (v if not isinstance(v, list) else "; ".join(v)) for k, v in row.items()}
                       for row in report["operators"]], "funnel.json")
    tracker.log_dict(report, "funnel_report.json")
    tracker.log_dataset(manifest, out_dir / "shards", name=f"{cfg.name}-curated")
    metrics = {"samples": manifest["count"], "funnel/seen": report["seen"], "funnel/kept": report["kept"],
               "funnel/failed_sources": len(report["failed_sources"]),
               **{f"funnel/dropped_{row['operator']}": row["dropped"] for row in report["operators"]}}
    tracker.log_metrics(metrics)
    tracker.log_dict(manifest, "shards_manifest.json")
    return StageResult("data", out_dir, metrics, manifest["content_hash"])


def _alignment_scorer(cfg):
    """The funnel's text-image scorer: the reward stage's model named by data.funnel.alignment_model, or None."""
    if not cfg.data.funnel.alignment_model:
        return None
    import torch

    from stages.reward import load_reward_model, reward_scores

    device = pick_device(cfg.device)
    model = load_reward_model(Path(cfg.data.funnel.alignment_model), device)

    @torch.no_grad()
    def score(images, captions):
        return reward_scores(cfg, model, images, captions, device).float().cpu().tolist()

    return score
