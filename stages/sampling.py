"""Sampling shared by training (sample grids), the eval stage and `kiln generate`: load what a stage produced and
turn captions into images with the project's sampler."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from data.synthetic import caption, eval_prompts, make_holdout
from kiln.checkpoint import resolve_checkpoint
from kiln.config import config_from_dict
from kiln.generate import generate_images, image_grid
from kiln.geometry import latent_channels, vae_factor
from kiln.models import build_backbone
from kiln.stage_io import read_stage_manifest
from kiln.text_encoder import text_encoder_for
from kiln.vae import vae_for
from kiln.weights import load_generator


def load_stage(stage_dir: Path, device="cpu", which: str = "ema"):
    """A training stage's output folder (or one of its checkpoints) -> (config, transformer, vae dir, ckpt meta)."""
    stage_dir = Path(stage_dir)
    ckpt = resolve_checkpoint(stage_dir)
    manifest_dir = next((p for p in (ckpt, *ckpt.parents) if (p / "manifest.json").exists()), None)
    if manifest_dir is None:
        raise FileNotFoundError(f"generate: no stage manifest.json at or above {ckpt}: pass a stage output folder")
    manifest = read_stage_manifest(manifest_dir)
    cfg = config_from_dict(manifest["config"])
    model = build_backbone(cfg.model, latent_channels(cfg.vae), cfg.text_encoder.dim)
    load_generator(ckpt, model, which)  # a LoRA stage's adapter is fused into its base here
    meta = json.loads((ckpt / "meta.json").read_text())
    return cfg, model.to(device).eval(), Path(manifest["inputs"]["vae"]), meta


@torch.no_grad()
def generate_for_captions(cfg, model, vae, captions: list[str], *, width, height, steps, cfg_scale, seed,
                          negative_prompt: str | None = None, batch_size: int = 16, progress=False):
    """PIL images for captions, in batches; image i uses generator seed+i's stream via one seeded generator."""
    device = next(model.parameters()).device
    encoder = text_encoder_for(cfg, device)
    neg = cfg.sampler.negative_prompt if negative_prompt is None else negative_prompt
    null_text, null_mask = encoder([neg])
    generator = torch.Generator(device=device).manual_seed(seed)
    images = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        text, mask = encoder(chunk)
        images += generate_images(model, vae, text, mask, null_text, null_mask, height=height, width=width,
                                  vae_factor=vae_factor(cfg.vae), steps=steps, cfg=cfg_scale, sched=cfg.scheduler,
                                  generator=generator, objective=cfg.objective, sampler=cfg.sampler.kind,
                                  cfg_renorm=cfg.sampler.cfg_renorm, progress=progress)
    return images


def sample_captions(cfg, n_per_split: int = 4) -> list[str]:
    """A fixed mix of training and held-out prompts for the sample grids logged during training."""
    holdout = make_holdout(cfg.data.holdout_seed)
    rng = random.Random(cfg.seed)
    specs = eval_prompts(holdout, "train", 2, cfg.seed)[:n_per_split] + \
        eval_prompts(holdout, "heldout", 2, cfg.seed)[:n_per_split]
    return [caption(spec, rng) for spec in specs]


def log_samples(cfg, model, inputs: dict, out_dir: Path, tracker, step: int, resolution: int) -> Path:
    """Write samples/step-N.png (a labelled grid) and log it to MLflow at this step."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vae = vae_for(cfg, Path(inputs["vae"]), device)
    captions = sample_captions(cfg)
    images = generate_for_captions(cfg, model, vae, captions, width=resolution, height=resolution,
                                   steps=cfg.sampler.steps, cfg_scale=cfg.sampler.cfg, seed=cfg.seed)
    grid = image_grid(images, captions, cols=len(captions) // 2)
    path = Path(out_dir) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    tracker.log_image(grid, key="samples", step=step)
    model.train(was_training)
    return path
