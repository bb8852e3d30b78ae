"""The eval stage for task captions (your own images): what a generator stage's model does on the held-out split of
the curated images, which no stage trains on.

- Held-out flow-matching loss: every held-out image at the evaluated resolution, at eval.loss_timesteps with fixed
  noise, so two stages' losses pair image for image.
- Frechet distance between eval.heldout_images generated images (one per held-out caption, the first in a seeded
  order, fixed noise) and all held-out images, on the features stage's contrastive image encoder; beside it the distance of as many training
  images to the same held-out set: what a model that draws the data's distribution would score at this sample size.
- Alignment: the cosine between each generated image and its caption on the contrastive scorer, with two
  references: real held-out images against their own captions (the ceiling) and the generated images against other
  held-out captions (a model that ignores the text).
- Paired gains over the previous evaluated stage (same captions, same noise): alignment per caption and held-out
  loss per image, with 95% bootstrap intervals (kiln/stats.py).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from data.buckets import buckets_for
from data.shards import iter_samples, read_manifest
from kiln import seeding
from kiln.contrastive import ContrastiveScorer, alignment
from kiln.diffusion import fixed_time_loss
from kiln.features import frechet_distance
from kiln.generate import image_grid
from kiln.images import image_tensor
from kiln.stats import paired_bootstrap_ci
from stages.common import write_json
from kiln.features import load_feature_net
from stages.features import one_per_image, padded_text, shuffled
from stages.sampling import generate_for_captions

ROWS = "captions_eval.json"  # samples/ROWS: per-caption and per-image scores, what the next stage pairs against


def heldout_loss(cfg, model, latents_dir: Path, resolution: int, device) -> list[dict]:
    """[{key, loss}] for every held-out sample at the evaluated resolution's buckets, in shard order."""
    available = set(read_manifest(latents_dir / "heldout")["buckets"])
    buckets = [b for b in buckets_for(resolution, cfg.data.aspect_ratios, cfg.data.bucket_multiple)
               if f"{b[0]}x{b[1]}" in available]
    samples = list(iter_samples(latents_dir / "heldout", buckets=buckets, load_images=False)) if buckets else []
    if not samples:
        raise ValueError(f"eval: no held-out images at {resolution} px in {latents_dir / 'heldout'}")
    generator = torch.Generator(device=device).manual_seed(cfg.eval.seed)
    rows = []
    for start in range(0, len(samples), cfg.eval.batch_size):
        chunk = samples[start:start + cfg.eval.batch_size]
        for bucket in sorted({tuple(s["bucket"]) for s in chunk}):  # one latent shape per forward pass
            same = [s for s in chunk if tuple(s["bucket"]) == bucket]
            latents = torch.stack([s["latents"].float() for s in same]).to(device)  # (b, C, h, w)
            text, mask = padded_text(same, cfg.text_encoder.max_length)
            losses = fixed_time_loss(model, latents, text.to(device), mask.to(device), cfg.objective,
                                     cfg.eval.loss_timesteps, generator)
            rows += [{"key": s["key"], "loss": float(v)} for s, v in zip(same, losses)]
    return rows


def run(cfg, model, vae, inputs: dict, out_dir: Path, resolution: int, tracker, device) -> dict:
    ecfg = cfg.eval
    for name in ("features", "data", "latents"):
        if not inputs.get(name):
            raise ValueError(f"eval: task captions needs the {name} stage's output")
    scorer = load_feature_net(Path(inputs["features"]), device)
    if not isinstance(scorer, ContrastiveScorer):
        raise ValueError(f"eval: {inputs['features']} holds a synthetic-scene classifier, not the captions task's "
                         f"contrastive scorer: rerun the features stage")
    data = Path(inputs["data"])
    heldout = shuffled(one_per_image(data / "heldout"), ecfg.seed)  # the real held-out images, a fair order
    chosen = heldout[:ecfg.heldout_images]
    captions = [s["caption"] for s in chosen]
    generated = []
    for start in tqdm(range(0, len(captions), ecfg.batch_size), desc="eval", unit="batch"):
        generated += generate_for_captions(
            cfg, model, vae, captions[start:start + ecfg.batch_size], width=resolution, height=resolution,
            steps=ecfg.steps, cfg_scale=ecfg.cfg, seed=seeding.eval_batch(ecfg.seed, start),
            batch_size=ecfg.batch_size)

    real = torch.stack([image_tensor(s["image"]) if s["image"].size == chosen[0]["image"].size
                        else image_tensor(s["image"].resize(chosen[0]["image"].size)) for s in heldout]).to(device)
    fake = torch.stack([image_tensor(image) for image in generated]).to(device)
    text, mask = (t.to(device) for t in padded_text(chosen, cfg.text_encoder.max_length))
    all_text, all_mask = (t.to(device) for t in padded_text(heldout, cfg.text_encoder.max_length))
    others = [random.Random(seeding.eval_baseline(ecfg.seed) + i).choice([j for j in range(len(chosen)) if j != i])
              for i in range(len(chosen))]  # another held-out caption for each image
    generated_alignment = alignment(scorer, fake, text, mask)  # (N,)
    baseline_alignment = alignment(scorer, fake, text[others], mask[others])
    real_alignment = alignment(scorer, real, all_text, all_mask)
    # PNG bytes, decoded for the sample only: the training split may be large.
    train = shuffled(one_per_image(data / "shards", load_images="png"), ecfg.seed)[:len(generated)]
    train_images = torch.stack([image_tensor(Image.open(io.BytesIO(s["image_png"])).convert("RGB")
                                             .resize(chosen[0]["image"].size)) for s in train]).to(device)
    real_features = scorer(real).double().cpu().numpy()
    losses = heldout_loss(cfg, model, Path(inputs["latents"]), resolution, device)
    metrics = {
        "eval/captions/heldout_loss": sum(r["loss"] for r in losses) / len(losses),
        "eval/captions/frechet_distance": frechet_distance(scorer(fake).double().cpu().numpy(), real_features),
        "eval/captions/frechet_distance_train_images": frechet_distance(
            scorer(train_images).double().cpu().numpy(), real_features),
        "eval/captions/alignment": generated_alignment.mean().item(),
        "eval/captions/alignment_other_caption": baseline_alignment.mean().item(),
        "eval/captions/alignment_real_images": real_alignment.mean().item(),
        "eval/captions/generated": len(generated), "eval/captions/heldout_images": len(heldout),
        "eval/captions/loss_images": len(losses),
    }
    rows = {"captions": [{"caption": c, "alignment": float(a)} for c, a in zip(captions, generated_alignment)],
            "losses": losses}
    if inputs.get("previous"):
        previous_file = Path(inputs["previous"]) / "samples" / ROWS
        if previous_file.exists():
            metrics |= paired_gains(json.loads(previous_file.read_text())["rows"], rows)
            tracker.set_tags({"kiln.gain_over": Path(inputs["previous"]).name})
    samples = Path(out_dir) / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(generated):
        image.save(samples / f"{i:04d}-heldout.png")
    write_json(samples / ROWS, {"metrics": metrics, "rows": rows})
    grid = image_grid(generated[:32], [f"{a:.2f} {c[:28]}" for c, a in zip(captions, generated_alignment)], cols=8)
    grid.save(samples / "grid.png")
    tracker.log_image(grid, key="eval_grid", step=0)
    tracker.log_table(rows["captions"], "alignment_table.json")
    return metrics


def paired_gains(previous: dict, rows: dict) -> dict[str, float]:
    """Gains over the previous stage's evaluation on the same captions and noise: alignment per caption (higher is
    better) and held-out loss per image (lower is better; only between stages of one resolution), with 95% paired
    bootstrap intervals."""
    out = {}
    for name, unit, value in (("alignment", "captions", "alignment"), ("heldout_loss", "losses", "loss")):
        before, after = previous[unit], rows[unit]
        if unit == "losses" and [r["key"] for r in before] != [r["key"] for r in after]:
            continue  # the previous stage trained at another resolution: its loss is over other images
        if [r.get("caption") for r in before] != [r.get("caption") for r in after]:
            raise ValueError(f"eval: the previous stage's evaluation used other {unit}: the gain needs the same ones")
        gain, low, high = paired_bootstrap_ci([r[value] for r in before], [r[value] for r in after])
        key = f"eval/gain/captions/{name}"
        out |= {key: gain, f"{key}_low": low, f"{key}_high": high}
    return out
