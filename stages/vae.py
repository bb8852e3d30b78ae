"""VAE stage. `tiny`/`small`: train a small AutoencoderKLQwenImage on the rendered images (random crops; the VAE
is fully convolutional), log reconstruction PSNR, then measure per-channel latent mean/std on the data and save
them in the VAE's own config. The loop is kiln/trainer.py's: checkpoints every cadence.checkpoint_every steps
and on SIGTERM, a rerun resumes from the latest. `qwen-image`: the pretrained VAE is loaded where the latents stage needs it."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from data.shards import iter_samples
from kiln import seeding
from kiln.generate import to_pil
from kiln.images import image_tensor
from kiln.stage_io import StageResult, hash_files
from kiln.trainer import Schedule, Trainer
from kiln.vae import build_vae, decode_for_training
from stages.common import pick_device

PSNR_IMAGES = 64
RECON_IMAGES = 192  # the reconstruction check's images (synthetic task)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Images in [-1, 1]; PSNR over the [0, 1] range."""
    mse = ((a - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-10))


def foreground_mask(images: torch.Tensor) -> torch.Tensor:
    """1 where a pixel is saturated (an object), 0 on the plain light background. images in [-1, 1], channel dim 1."""
    chroma = images.max(dim=1, keepdim=True).values - images.min(dim=1, keepdim=True).values
    return (chroma > 0.4).float()


def _random_crops(images: list[torch.Tensor], n: int, crop: int, rng: random.Random,
                  channel_permute: float = 0.0) -> torch.Tensor:
    out = []
    for _ in range(n):
        img = images[rng.randrange(len(images))]
        _, h, w = img.shape
        size = min(crop, h, w)
        y, x = rng.randrange(h - size + 1), rng.randrange(w - size + 1)
        img = img[:, y : y + size, x : x + size]
        if channel_permute and rng.random() < channel_permute:
            img = img[rng.sample(range(3), 3)]  # e.g. red -> blue, yellow -> cyan
        out.append(img)
    return torch.stack(out)  # (B, 3, crop, crop)


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir = Path(out_dir)
    if cfg.vae.pretrained:
        # Nothing to train: record which VAE the later stages load.
        metrics = {"pretrained": 1.0}
        return StageResult("vae", out_dir, metrics, f"pretrained:{cfg.vae.pretrained}")

    device = pick_device(cfg.device)
    tcfg = cfg.vae.train
    samples = list(iter_samples(Path(inputs["data"]) / "shards", load_images=True))
    images, captions = [image_tensor(s["image"]) for s in samples], [s["caption"] for s in samples]
    if len(images) <= PSNR_IMAGES:
        raise ValueError(f"vae: need more than {PSNR_IMAGES} images to train and measure, got {len(images)}")
    held, train = images[:PSNR_IMAGES], images[PSNR_IMAGES:]
    smallest = min(min(img.shape[1:]) for img in train)
    if tcfg.crop > smallest:  # every crop in a batch must have the same size
        raise ValueError(f"vae: vae.train.crop={tcfg.crop} is larger than the smallest image side {smallest} "
                         f"(bucket sizes come from the rungs and data.aspect_ratios)")

    # Attempts already failed (a rerun after an interruption resumes the attempt it was in).
    attempt, start = len(list(out_dir.glob("failed-attempt-*"))), time.time()
    while True:
        vae, trainer = _train(cfg, train, device, out_dir, tracker, seeding.vae_attempt(cfg.seed, attempt))
        check = reconstruction_check(cfg, vae, images, captions, device)
        failed = bool(check) and check["vae/recon/colour_worst"] < tcfg.min_colour_kept
        if not failed or attempt + 1 >= tcfg.attempts:
            break
        print(f"vae: attempt {attempt + 1} of {tcfg.attempts} kept a colour in only "
              f"{check['vae/recon/colour_worst']:.0%} of reconstructions (vae.train.min_colour_kept="
              f"{tcfg.min_colour_kept}); training again from another seed", flush=True)
        failed_dir = out_dir / f"failed-attempt-{attempt}"  # kept for a look, never loaded; also counts attempts
        if (out_dir / "checkpoints").exists():  # a short attempt may not have reached a periodic checkpoint
            (out_dir / "checkpoints").rename(failed_dir)
        else:
            failed_dir.mkdir()
        attempt += 1
    if failed:
        print(f"vae: warning: after {tcfg.attempts} attempts the VAE keeps a colour in only "
              f"{check['vae/recon/colour_worst']:.0%} of reconstructions; later stages cannot draw it", flush=True)
    return _finish(cfg, vae, held, train, device, out_dir, tracker, start, trainer,
                   {**check, "vae/attempts": attempt + 1})


def _train(cfg, train: list[torch.Tensor], device, out_dir: Path, tracker, seed: int):
    """One attempt: a fresh VAE from `seed` (init and crops) trained for vae.train.steps, or resumed from the
    latest checkpoint in out_dir."""
    tcfg = cfg.vae.train
    torch.manual_seed(seed)
    rng = random.Random(seed)  # the crops: saved in checkpoints, so a resumed stage draws the same ones
    vae = build_vae(cfg.vae).to(device).train()
    # Warm-up over the first tenth (at most 50 steps), with the cosine decay to zero running from step 0.
    schedule = Schedule(warmup=min(50, max(1, tcfg.steps // 10)), total=tcfg.steps, decay="cosine", decay_start=0)
    trainer = Trainer("vae", vae, cfg, steps=tcfg.steps, lr=tcfg.lr, schedule=schedule, out_dir=out_dir,
                      tracker=tracker, device=device, weight_decay=0.0, grad_clip=tcfg.grad_clip,
                      state={"rng": rng}, meta={"kind": "vae"}, log_prefix="vae")
    trainer.start()

    def crops():
        while True:
            yield _random_crops(train, tcfg.batch_size, tcfg.crop, rng, tcfg.channel_permute)

    def forward_backward(crops: torch.Tensor) -> dict:
        x = crops.to(device)[:, :, None]  # (B, 3, 1, c, c): the Qwen-Image VAE is a video VAE with one frame
        posterior = vae.encode(x).latent_dist
        # Train on the posterior mean (the latents stage encodes with it too): sampling noise of std ~1 at init
        # swamps the small initial means and the decoder learns to ignore the latent.
        recon = decode_for_training(vae, posterior.mode())
        # Objects cover a few percent of the pixels; without weighting them up, a from-scratch VAE sits for a
        # long time at "background plus grey blobs" and never learns which colour an object has.
        weight = 1 + (tcfg.foreground_weight - 1) * foreground_mask(x)
        rec_loss = (weight * ((recon - x).abs() + (recon - x).pow(2))).mean()
        loss = rec_loss + tcfg.kl_weight * posterior.kl().mean()
        loss.backward()
        return {"loss": loss.detach()}

    trainer.fit(forward_backward, crops, save_final=False)
    return vae, trainer


def reconstruction_check(cfg, vae, images: list[torch.Tensor], captions: list[str], device) -> dict[str, float]:
    """Synthetic task: the verifier on the reconstructions of RECON_IMAGES images spread over every bucket, each
    against its own caption. `vae/recon/colour_worst` is the colour the VAE keeps least often: PSNR alone missed a
    VAE that decoded every red object as yellow (16 dB against 21, but the DiT trained on it could never draw red).
    Other tasks: nothing (PSNR is their measure)."""
    if cfg.task_kind != "synthetic":
        return {}
    from data.synthetic import parse_caption
    from reward.verifier import verify

    vae.eval()
    # The verifier reads COLOURS and SHAPES only: training-only extras (data.extra_colours, extra_shapes) are left out.
    checked = [(img, text) for img, text in zip(images, captions) if parse_caption(text).verifiable()]
    every = max(1, len(checked) // RECON_IMAGES)
    verdicts = []
    with torch.no_grad():
        for img, text in checked[::every][:RECON_IMAGES]:
            z = vae.encode(img[None, :, None].to(device)).latent_dist.mode()
            recon = vae.decode(z).sample[:, :, 0].cpu()  # (1, 3, H, W)
            verdicts.append(verify(to_pil(recon)[0], text))
    kept: dict[str, list[bool]] = {}
    for verdict in verdicts:
        found = {d.colour for d in verdict.detections}
        for colour, _ in verdict.spec.pairs():
            kept.setdefault(colour, []).append(colour in found)
    per_colour = {colour: sum(hits) / len(hits) for colour, hits in sorted(kept.items())}
    return {"vae/recon/correct": sum(v.correct for v in verdicts) / len(verdicts),
            "vae/recon/colour_worst": min(per_colour.values()),
            **{f"vae/recon/colour_{colour}": value for colour, value in per_colour.items()}}


def _finish(cfg, vae, held, train, device, out_dir, tracker, start, trainer, extra: dict) -> StageResult:
    """Reconstruction PSNR on held-out images, latent statistics into the config, the final checkpoint."""
    tcfg = cfg.vae.train
    vae.eval()
    with torch.no_grad():
        recon_psnr, latents = [], []
        for img in held:
            x = img[None, :, None].to(device)
            z = vae.encode(x).latent_dist.mode()
            recon_psnr.append(psnr(vae.decode(z).sample[:, :, 0].clamp(-1, 1).cpu(), img[None]))
        for img in train[:512]:
            latents.append(vae.encode(img[None, :, None].to(device)).latent_dist.mode()[0, :, 0].flatten(1).cpu())
        z = torch.cat(latents, dim=1)  # (C, pixels)
        mean, std = z.mean(dim=1), z.std(dim=1).clamp_min(1e-4)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    ckpt = trainer.save(final=True, keep=1)  # the periodic checkpoints go: later stages load the final one
    vae.save_config(ckpt)  # config.json, with the latent statistics

    metrics = {"vae/psnr": float(np.mean(recon_psnr)), **extra, "vae/seconds": time.time() - start}
    tracker.log_metrics(metrics, step=tcfg.steps)
    tracker.log_dict({"latents_mean": mean.tolist(), "latents_std": std.tolist()}, "latent_stats.json")
    tracker.set_tags({"kiln.checkpoint": str(ckpt.resolve())})
    return StageResult("vae", out_dir, metrics, hash_files(out_dir / "checkpoints"))
