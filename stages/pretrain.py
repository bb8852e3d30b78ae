"""Pretrain stage: one rung of the progressive-resolution ladder (e.g. 64 px, then 128 px starting from it).

Rectified-flow training of the Qwen-Image MMDiT on cached latents: this module supplies the model, the
bucket-homogeneous batches and the loss step; kiln/trainer.py runs the loop (AdamW, warm-up then cosine decay,
clipping, EMA, exact resume, checkpoints, SIGTERM). bf16 autocast on GPU. Run alone: python -m stages.pretrain --preset tiny --rung 0 --data DIR --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data.buckets import buckets_for
from data.shards import BucketBatches, read_manifest
from kiln import distributed, seeding
from kiln.diffusion import diffusion_loss
from kiln.flow import drop_captions, drop_tokens, loss_by_bucket
from kiln.geometry import latent_channels
from kiln.models import build_backbone, count_parameters, init_adaln_zero
from kiln.stage_io import StageResult, hash_files
from kiln.trainer import Schedule, Trainer
from stages.common import load_uncond, starting_weights, training_device


class DataPosition:
    """Where a bucket loader is in its epochs: part of a checkpoint, so a resumed rung sees the batches it would
    have seen."""

    def __init__(self) -> None:
        self.value = {"epoch": 0, "batch": 0}

    def state_dict(self) -> dict:
        return dict(self.value)

    def load_state_dict(self, state: dict) -> None:
        self.value = {k: int(v) for k, v in state.items()}


class Rung:
    """One resolution of flow-matching training on cached latents (a pretrain rung, or SFT one past the ladder):
    the model, its batches and its loss step, trained by kiln.trainer.Trainer with EMA, warm-up then cosine decay.

    Under torchrun every process builds the same model; the trainer replicates (DDP) or shards it (FSDP2), and each
    process takes its rows of every global batch, with t, noise and caption dropout drawn for the global batch."""

    def __init__(self, cfg, rung, seed_index: int, latents_dir: Path, out_dir: Path, tracker, label: str,
                 stage: str, init: Path | None):
        # seed_index: the rung's place in the ladder (SFT: one past it) -> its own init and noise streams.
        # init: the weights it starts from (the previous stage's, or model.pretrained; None: from scratch); a stage
        # in lora.stages trains an adapter over them.
        self.cfg, self.rung, self.latents_dir, self.init = cfg, rung, Path(latents_dir), init
        device = training_device(cfg)
        # SFT keeps the run's seed; the ladder may have its own (train.seed).
        self.seed = cfg.seed if stage == "sft" or cfg.train.seed is None else cfg.train.seed
        torch.manual_seed(seeding.rung(self.seed, seed_index))  # model init is part of the run's determinism
        manifest = read_manifest(self.latents_dir / "shards")
        if "latents" not in manifest.get("fields", []):
            raise ValueError(f"pretrain: shards at {latents_dir} hold no latents: run the latents stage first")
        self.buckets = [b for b in buckets_for(rung.resolution, cfg.data.aspect_ratios, cfg.data.bucket_multiple)
                        if f"{b[0]}x{b[1]}" in manifest["buckets"]]
        if not self.buckets:
            raise ValueError(f"pretrain: no {rung.resolution}px buckets in {latents_dir} "
                             f"(has {sorted(manifest['buckets'])})")
        # From-scratch init; a resumed or continued rung then loads its weights over it.
        model = build_backbone(cfg.model, latent_channels(cfg.vae), cfg.text_encoder.dim)
        model = init_adaln_zero(model) if cfg.train.init == "adaln_zero" and init is None else model
        lora = cfg.lora if cfg.uses_lora(stage) else None  # the trainer refuses a LoRA stage with nothing under it
        optim = cfg.train.optim
        self.position = DataPosition()
        self.generator = torch.Generator(device=device).manual_seed(seeding.rung(self.seed, seed_index))
        self.trainer = Trainer(
            label, model, cfg, steps=rung.steps, lr=rung.lr or optim.lr,
            schedule=Schedule(warmup=optim.warmup_steps, total=rung.steps, decay="cosine", floor=0.1),
            out_dir=out_dir, tracker=tracker, device=device, betas=optim.betas, weight_decay=optim.weight_decay,
            grad_clip=optim.grad_clip, ema_decay=optim.ema_decay,
            state={"generator": self.generator, "position": self.position},
            meta={"kind": "transformer", "resolution": rung.resolution, "latent_channels": latent_channels(cfg.vae)},
            lora=lora, base=(init, "ema") if lora is not None else None)
        self.null_text, self.null_mask = load_uncond(self.latents_dir / "uncond.safetensors", device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=device.type == "cuda" and cfg.train.precision == "bf16")

    def batches(self):
        cadence = self.cfg.cadence
        loader = BucketBatches(self.latents_dir / "shards", self.rung.batch_size, seed=self.seed,
                               buckets=self.buckets, start=self.position.value, cache_in_memory=cadence.cache_in_memory)
        if cadence.cache_in_memory:
            loader.preload()  # decode once, up front, so the training loop never waits on shard decoding
        for batch in loader.batches_forever():
            self.position.value = loader.position()
            if self.trainer.ranks.distributed:
                batch["rows"] = loader.rows
            yield batch

    def forward_backward(self, batch: dict) -> dict:
        device = self.trainer.device
        latents = batch["latents"].to(device, non_blocking=True)  # (b, C, h, w): this process's rows
        text = batch["text_emb"].to(device, non_blocking=True)  # (b, L, D)
        mask = batch["text_mask"].to(device, non_blocking=True)  # (b, L)
        rows = {"rows": batch["rows"], "global_batch": self.rung.batch_size} if "rows" in batch else {}
        mask = drop_tokens(mask, self.cfg.objective.token_dropout, self.generator, **rows,
                           width=self.cfg.text_encoder.max_length)
        text, mask = drop_captions(text, mask, self.null_text, self.null_mask,
                                   self.cfg.objective.caption_dropout, self.generator, **rows)
        with self.autocast:
            loss, per_sample, t = diffusion_loss(self.trainer.forward, latents, text, mask, self.cfg.objective,
                                                 self.cfg.scheduler, self.generator, **rows)
        loss.backward()  # DDP all-reduces, FSDP2 reduce-scatters: gradients of the global batch mean
        per_sample, t = distributed.gather_rows(per_sample.detach()), distributed.gather_rows(t)  # (B,) global
        by_t = loss_by_bucket(per_sample, t, self.cfg.objective.loss_buckets)
        return {"loss": per_sample.mean(), "images": t.shape[0],
                **{f"loss_t{i}": (total, count) for i, (total, count) in by_t.items()}}

    def sample(self, inputs: dict, step: int) -> None:
        from stages.sampling import log_samples  # noqa: PLC0415 - keeps sampling out of the training import path

        cfg = self.cfg
        channels = latent_channels(cfg.vae)
        with self.trainer.ema_model(lambda: build_backbone(cfg.model, channels, cfg.text_encoder.dim)) as ema:
            if ema is not None:
                log_samples(cfg, ema, inputs, self.trainer.out_dir, self.trainer.tracker, step, self.rung.resolution)

    def train(self, inputs: dict) -> float:
        """Resume from the output folder's latest checkpoint, else start from self.init when given; train to the
        rung's step count. Returns the last logged loss."""
        trainer = self.trainer
        trainer.start(self.init)
        if trainer.step == 0:
            trainer.tracker.log_metrics({"parameters": count_parameters(trainer.model)})
        last = trainer.fit(self.forward_backward, self.batches, sample=lambda step: self.sample(inputs, step))
        return last.get("loss", float("nan"))


def run(cfg, inputs: dict, out_dir: Path, tracker, rung_index: int = 0) -> StageResult:
    out_dir = Path(out_dir)
    rung = cfg.train.rungs[rung_index]
    stage = Rung(cfg, rung, rung_index, Path(inputs["latents"]), out_dir, tracker, f"pretrain {rung.resolution}px",
                 f"pretrain-{rung.resolution}", starting_weights(cfg, inputs))
    last_loss = stage.train(inputs)
    metrics = {"final_loss": last_loss, "steps": stage.trainer.step, "images_per_s": stage.trainer.images_per_s}
    return StageResult(f"pretrain-{rung.resolution}", out_dir, metrics, hash_files(out_dir / "checkpoints"))


def main() -> None:
    from kiln.config import load_config
    from kiln.tracking import Tracker

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--rung", type=int, default=0)
    parser.add_argument("--latents", required=True, help="output folder of the latents stage")
    parser.add_argument("--vae", required=True, help="output folder of the vae stage")
    parser.add_argument("--init", default=None, help="previous rung's output folder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = load_config(args.preset, args.overrides)
    inputs = {"latents": args.latents, "vae": args.vae, "init": args.init}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(run(cfg, inputs, Path(args.out), Tracker(None), args.rung))


if __name__ == "__main__":
    main()
