"""Pretrain stage: one rung of the progressive-resolution ladder (e.g. 64 px, then 128 px starting from it).

Rectified-flow training of the Qwen-Image MMDiT on cached latents with AdamW, linear warm-up then cosine decay,
gradient clipping, EMA, bf16 autocast on GPU, and checkpoints that hold everything needed to continue exactly
(model, EMA, optimizer, LR schedule, step, RNG state, data position). A restarted stage resumes from its latest
checkpoint. Run alone: python -m stages.pretrain --preset tiny --rung 0 --data DIR --out DIR
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.buckets import buckets_for
from data.shards import BucketBatches, read_manifest
from kiln import distributed
from kiln.checkpoint import (latest_checkpoint, load_training_state, load_weights, resolve_checkpoint,
                             save_training_state)
from kiln.diffusion import diffusion_loss
from kiln.flow import drop_captions, loss_by_bucket
from kiln.models import build_backbone, count_parameters, init_adaln_zero
from kiln.preemption import Preempted, Preemption
from kiln.stage_io import StageResult, hash_files
from stages.common import load_uncond, pick_device


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up, then cosine decay to `floor` of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)


class Trainer:
    """Everything one rung needs; `step()` is one optimisation step on one bucket-homogeneous batch.

    Under torchrun (kiln.distributed) every process builds the same model, wraps it (DDP, or FSDP2 sharding model
    and EMA alike) and trains on its rows of each global batch; checkpoints are whole files (one process, DDP,
    written by rank 0) or sharded (FSDP2), and either kind resumes under any number of processes."""

    def __init__(self, cfg, rung_index: int, latents_dir: Path, device: torch.device, rung=None):
        # rung: a RungConfig to train instead of cfg.train.rungs[rung_index] (SFT trains one past the ladder).
        self.cfg, self.rung = cfg, rung or cfg.train.rungs[rung_index]
        self.ranks = distributed.ranks()
        self.device = device = distributed.device_for(device, self.ranks)
        torch.manual_seed(cfg.seed * 1000 + rung_index)  # model init is part of the run's determinism
        manifest = read_manifest(Path(latents_dir) / "shards")
        if "latents" not in manifest.get("fields", []):
            raise ValueError(f"pretrain: shards at {latents_dir} hold no latents: run the latents stage first")
        self.latents_dir = Path(latents_dir)
        buckets = [b for b in buckets_for(self.rung.resolution, cfg.data.aspect_ratios, cfg.data.bucket_multiple)
                   if f"{b[0]}x{b[1]}" in manifest["buckets"]]
        if not buckets:
            raise ValueError(f"pretrain: no {self.rung.resolution}px buckets in {latents_dir} "
                             f"(has {sorted(manifest['buckets'])})")
        self.buckets = buckets
        self.latent_channels = cfg.vae.z_dim
        # From-scratch init; a resumed or continued rung then loads its weights over it.
        model = build_backbone(cfg.model, self.latent_channels, cfg.text_encoder.dim)
        self.model = (init_adaln_zero(model) if cfg.train.init == "adaln_zero" else model).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.sharded = self.ranks.distributed and cfg.distributed.strategy == "fsdp"
        if self.sharded:  # EMA sharded like the model, so the per-step lerp is shard against shard
            distributed.shard(self.ema)
        # self.model holds the weights (sharded in place by FSDP2); self.forward is what the step calls (DDP wraps).
        self.forward = distributed.wrap(self.model, cfg.distributed.strategy, device)
        optim = cfg.train.optim
        lr = self.rung.lr or optim.lr
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name else decay).append((name, p))
        # The optimizer's parameter order by name: what a whole checkpoint's state indices refer to.
        self.param_names = [name for name, _ in decay + no_decay]
        decay, no_decay = [p for _, p in decay], [p for _, p in no_decay]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=tuple(optim.betas), fused=device.type == "cuda",
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim.warmup_steps, self.rung.steps))
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rung_index)
        self.null_text, self.null_mask = load_uncond(self.latents_dir / "uncond.safetensors", device)
        self.step_count = 0
        self.images_per_s = float("nan")  # steady-state training throughput, set by fit()
        self.position = {"epoch": 0, "batch": 0}
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=device.type == "cuda" and cfg.train.precision == "bf16")

    def batches(self):
        loader = BucketBatches(self.latents_dir / "shards", self.rung.batch_size, seed=self.cfg.seed,
                               buckets=self.buckets, start=self.position, cache_in_memory=self.cfg.cadence.cache_in_memory)
        if self.cfg.cadence.cache_in_memory:
            loader.preload()  # decode once, up front, so the training loop never waits on shard decoding
        for batch in loader.batches_forever():
            self.position = loader.position()
            if self.ranks.distributed:
                batch["rows"] = loader.rows
            yield batch

    def step(self, batch: dict) -> dict:
        """One AdamW step. Returns tensors (no host sync) for logging."""
        latents = batch["latents"].to(self.device, non_blocking=True)  # (b, C, h, w): this process's rows
        text = batch["text_emb"].to(self.device, non_blocking=True)  # (b, L, D)
        mask = batch["text_mask"].to(self.device, non_blocking=True)  # (b, L)
        rows = {"rows": batch["rows"], "global_batch": self.rung.batch_size} if "rows" in batch else {}
        text, mask = drop_captions(text, mask, self.null_text, self.null_mask,
                                   self.cfg.objective.caption_dropout, self.generator, **rows)
        with self.autocast:
            loss, per_sample, t = diffusion_loss(self.forward, latents, text, mask, self.cfg.objective,
                                                 self.cfg.scheduler, self.generator, **rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces, FSDP2 reduce-scatters: gradients of the global batch mean
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.schedule.step()
        ema_update(self.ema, self.model, self.cfg.train.optim.ema_decay)
        self.step_count += 1
        per_sample, t = distributed.gather_rows(per_sample.detach()), distributed.gather_rows(t)  # (B,) global
        return {"loss": per_sample.mean(), "per_sample": per_sample, "t": t, "grad_norm": grad_norm}

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything but weights and optimizer needed to continue exactly."""
        return {
            "schedule": self.schedule.state_dict(),
            "step": self.step_count,
            "position": self.position,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def save(self, out_dir: Path, final: bool = False) -> Path:
        """Collective under torchrun (see kiln.checkpoint.save_training_state)."""
        meta = {"kind": "transformer", "resolution": self.rung.resolution, "latent_channels": self.latent_channels}
        return save_training_state(out_dir / "checkpoints", self.step_count, self.model, self.ema, self.optimizer,
                                   self.state(), meta, self.cfg.cadence.keep_checkpoints, self.sharded, final)

    def resume(self, ckpt: Path) -> None:
        state = load_training_state(ckpt, self.model, self.ema, self.optimizer, self.param_names, self.sharded)
        self.schedule.load_state_dict(state["schedule"])
        self.step_count = int(state["step"])
        self.position = {k: int(v) for k, v in state["position"].items()}
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    def init_from(self, previous_stage: Path) -> None:
        """Start a rung from the previous rung's weights (model and EMA)."""
        ckpt = resolve_checkpoint(previous_stage)
        load_weights(ckpt, self.model, "model")
        load_weights(ckpt, self.ema, "ema")

    def whole_ema(self) -> torch.nn.Module | None:
        """The EMA model whole, for sampling on rank 0 (collective under FSDP2: gathers the shards); None on other
        ranks."""
        if not self.sharded:
            return self.ema if self.ranks.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ranks.is_main:
            return None
        ema = build_backbone(self.cfg.model, self.latent_channels, self.cfg.text_encoder.dim)
        ema.load_state_dict(state)
        return ema.to(self.device).requires_grad_(False).eval()


def run(cfg, inputs: dict, out_dir: Path, tracker, rung_index: int = 0) -> StageResult:
    out_dir = Path(out_dir)
    trainer = Trainer(cfg, rung_index, Path(inputs["latents"]), pick_device(cfg.device))
    last_loss = fit(cfg, trainer, inputs, out_dir, tracker, f"pretrain {trainer.rung.resolution}px")
    metrics = {"final_loss": last_loss, "steps": trainer.step_count, "images_per_s": trainer.images_per_s}
    return StageResult(f"pretrain-{trainer.rung.resolution}", out_dir, metrics, hash_files(out_dir / "checkpoints"))


def fit(cfg, trainer: Trainer, inputs: dict, out_dir: Path, tracker, label: str) -> float:
    """Train `trainer` to its rung's step count: resume from out_dir's latest checkpoint, else start from
    inputs["init"] (a previous stage's output) when given. Logs to `tracker`, writes checkpoints and sample grids,
    tags the final checkpoint. Returns the last logged loss."""
    from stages.sampling import log_samples  # noqa: PLC0415 - keeps sampling out of the trainer's import path

    rung = trainer.rung
    ckpt = latest_checkpoint(out_dir / "checkpoints")
    if ckpt is not None:
        trainer.resume(ckpt)
        tqdm.write(f"{label}: resuming {out_dir.name} from {ckpt.name}")
    elif inputs.get("init"):
        trainer.init_from(Path(inputs["init"]))
    if trainer.step_count == 0:
        tracker.log_metrics({"parameters": count_parameters(trainer.model)})

    log_every, buckets = cfg.cadence.log_every, cfg.objective.loss_buckets
    window = {"loss": 0.0, "grad_norm": 0.0, "n": 0, "images": 0, "start": time.perf_counter()}
    # Steady-state throughput: images between the first and the last log point (start-up and the samples left out).
    images_seen, log_points = 0, []
    bucket_sums: dict[int, list[float]] = {}
    bar = tqdm(total=rung.steps, initial=trainer.step_count, desc=label, unit="step",
               disable=not trainer.ranks.is_main)
    batches = trainer.batches()
    last_loss = float("nan")
    with Preemption() as preemption:  # SIGTERM: checkpoint at the end of this step, then stop
        while trainer.step_count < rung.steps:
            out = trainer.step(next(batches))
            loss_value = out["loss"].item()  # one host read per step
            window["loss"] += loss_value
            window["grad_norm"] += float(out["grad_norm"])
            window["n"] += 1
            window["images"] += out["t"].shape[0]
            images_seen += out["t"].shape[0]
            for i, (total, count) in loss_by_bucket(out["per_sample"], out["t"], buckets).items():
                acc = bucket_sums.setdefault(i, [0.0, 0])
                acc[0] += total
                acc[1] += count
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{label}: loss is {loss_value} at step {trainer.step_count}; "
                                         f"last good checkpoint: {latest_checkpoint(out_dir / 'checkpoints')}")
            step = trainer.step_count
            bar.update(1)
            if step % log_every == 0 or step == rung.steps:
                log_points.append((time.perf_counter(), images_seen))
                elapsed = time.perf_counter() - window["start"]
                last_loss = window["loss"] / window["n"]
                metrics = {
                    "train/loss": last_loss,
                    "train/grad_norm": window["grad_norm"] / window["n"],
                    "train/lr": trainer.schedule.get_last_lr()[0],
                    "train/images_per_s": window["images"] / elapsed,
                    **{f"train/loss_t{i}": s / c for i, (s, c) in bucket_sums.items()},
                }
                tracker.log_metrics(metrics, step=step)
                bar.set_postfix(loss=f"{last_loss:.4f}")
                window.update(loss=0.0, grad_norm=0.0, n=0, images=0, start=time.perf_counter())
                bucket_sums.clear()
            if step % cfg.cadence.checkpoint_every == 0 and step < rung.steps:
                trainer.save(out_dir)
            if step % cfg.cadence.sample_every == 0 or step == rung.steps:
                ema = trainer.whole_ema()
                if ema is not None:
                    log_samples(cfg, ema, inputs, out_dir, tracker, step, rung.resolution)
            # Every process checkpoints at the same step when any of them was signalled.
            if distributed.any_rank(preemption.requested, trainer.device) and step < rung.steps:
                path = trainer.save(out_dir)
                raise Preempted(f"{label}: stopped by SIGTERM at step {step}; checkpoint {path} (rerun to resume)")
    bar.close()
    if len(log_points) > 1:
        (t0, n0), (t1, n1) = log_points[0], log_points[-1]
        trainer.images_per_s = (n1 - n0) / (t1 - t0)
    final = trainer.save(out_dir, final=True)
    tracker.set_tags({"kiln.checkpoint": str(final.resolve())})
    return last_loss


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
