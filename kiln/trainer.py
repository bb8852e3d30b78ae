"""One training loop for every stage that trains something (vae, pretrain rungs, sft, reward, dpo, grpo, features).

A stage hands the trainer its model and a `forward_backward(batch) -> metrics` step (the stage computes its loss and
calls `.backward()` itself, once or several times to accumulate); the trainer owns everything around it:

    zero grads -> forward_backward -> NaN/inf check -> average gradients (data parallel) -> clip -> LR -> step -> EMA

plus exact resume (model, EMA, optimizer, step, every RNG the stage registers, its data position), checkpoint cadence
and retention, SIGTERM (checkpoint, then `Preempted`) agreed across ranks, the progress bar, metric windows logged
to the tracker, optional sample grids, and the final checkpoint. The cadence (how often to log, checkpoint, sample)
comes from the config's `cadence` section, which no cache key reads.

LoRA plugs in here once too (`lora`, kiln/adapters.py): the trainer loads the stage's base weights, freezes them,
adds the adapter, and from then on the optimizer, the EMA and every checkpoint hold the adapter only; meta.json
records the base, so kiln.weights.load_generator rebuilds the full weights. Without `lora`, `start(init)` loads
full weights from the previous stage or from released ones (model.pretrained).

Data parallelism plugs in here once: "ddp" replicates the model (a DDP wrapper for stages with one backward per
step; gradients averaged by hand before the step for stages that accumulate several backwards), "fsdp" shards model
and EMA with FSDP2. Checkpoints are whole files from rank 0 or sharded (kiln/checkpoint.py), loadable under any
number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from tqdm.auto import tqdm

from kiln import distributed
from kiln.adapters import AdapterEMA, AdapterWeights, attach_lora, fuse_adapter
from kiln.checkpoint import latest_checkpoint, load_training_state, save_training_state, whole_state
from kiln.weights import base_record, load_generator
from kiln.preemption import Preempted, Preemption


@dataclass(frozen=True)
class Schedule:
    """Learning-rate shape: linear warm-up over `warmup` steps times a decay to `floor` of the peak.

    decay "cosine" runs from step `decay_start` (default: the end of the warm-up) to `total`; "constant" keeps the
    peak. lr(step) = (peak * warm-up factor) * decay factor, multiplied in that order (the order every stage used
    before there was one implementation, so the numbers did not move)."""

    warmup: int = 0
    total: int = 1
    decay: Literal["cosine", "constant"] = "cosine"
    floor: float = 0.0
    decay_start: int | None = None

    def lr(self, peak: float, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.decay == "constant":
            return peak * warm
        start = self.warmup if self.decay_start is None else self.decay_start
        progress = min(1.0, max(0, step - start) / max(1, self.total - start))
        return (peak * warm) * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: torch.nn.Module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                    device: torch.device | None = None) -> tuple[torch.optim.Optimizer, list[str]]:
    """AdamW with weight decay on weight matrices only (not on biases, norms or embeddings' 1-d scales), fused on
    CUDA. Returns the optimizer and its parameters' names in order (what a whole checkpoint's state indices mean)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append((name, param))
    names = [name for name, _ in decay + no_decay]
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused), names


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    """ema, model: modules (or adapter views) whose parameters() pair up in order."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def _get_state(obj):
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, random.Random):
        return obj.getstate()
    return obj.state_dict()


def _set_state(obj, state) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, random.Random):
        obj.setstate(state)
    else:
        obj.load_state_dict(state)


class Trainer:
    """The loop. `steps`: optimizer steps to train to; `lr`, `schedule`, `betas`, `weight_decay`, `grad_clip` (None:
    no clipping) set the optimizer; `ema_decay` (None: no EMA) keeps an EMA copy; `state`: named objects to save
    and restore exactly (torch.Generator, random.Random, or anything with state_dict/load_state_dict, such as a
    data position); `meta`: written into each checkpoint's meta.json. `one_backward`: the stage calls backward
    once per step (DDP can overlap its all-reduce with it); False when it accumulates several. `lora` (settings) and
    `base` (a folder and "ema"/"model"): train a LoRA adapter over those weights instead of the whole model."""

    def __init__(self, name: str, model: torch.nn.Module, cfg, *, steps: int, lr: float, schedule: Schedule,
                 out_dir: Path, tracker, device: torch.device, betas=(0.9, 0.999), weight_decay: float = 0.0,
                 grad_clip: float | None = 1.0, ema_decay: float | None = None, state: dict | None = None,
                 meta: dict | None = None, one_backward: bool = True, log_prefix: str = "train",
                 log_every: int | None = None, postfix: tuple[str, ...] = ("loss",), lora=None,
                 base: tuple[Path, str] | None = None):
        self.name, self.cfg, self.steps, self.peak_lr, self.schedule = name, cfg, steps, lr, schedule
        self.out_dir, self.tracker, self.grad_clip, self.ema_decay = Path(out_dir), tracker, grad_clip, ema_decay
        self.state, self.meta = dict(state or {}), dict(meta or {})
        self.log_prefix, self.postfix = log_prefix, postfix
        self.log_every = log_every or cfg.cadence.log_every
        self.ranks = distributed.ranks()
        self.device = device
        self.lora = lora
        if lora is not None:
            if base is None:
                raise ValueError(f"{name}: a LoRA stage needs base weights (the previous stage or model.pretrained)")
            load_generator(base[0], model, base[1])
            with torch.random.fork_rng(devices=[]):  # A's init from the run's seed, whatever ran before
                torch.manual_seed(cfg.seed)
                attach_lora(model, lora)
            self.meta.update(kind="lora", lora=lora.model_dump(mode="json"),
                             base=base_record(self.out_dir / "checkpoints", *base))
        self.model = model.to(device)
        self.base = base
        strategy = cfg.distributed.strategy
        self.sharded = self.ranks.distributed and strategy == "fsdp"
        if ema_decay is not None and lora is None:
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
            if self.sharded:  # EMA sharded like the model, so the lerp is shard against shard
                distributed.shard(self.ema)
        # self.model holds the weights (sharded in place by FSDP2); self.forward is what a stage's step calls.
        if one_backward or strategy == "fsdp":
            self.forward = distributed.wrap(self.model, strategy, device)
        else:
            self.forward = self.model
        # What checkpoints and the EMA hold: the whole model, or only its adapter (taken after FSDP2 has replaced
        # the parameters with its sharded ones, so an adapter's EMA is sharded like the adapter).
        self.weights = AdapterWeights(self.model) if lora is not None else self.model
        if lora is not None:
            self.ema = AdapterEMA(self.model) if ema_decay is not None else None
        elif ema_decay is None:
            self.ema = None
        self.average_by_hand = self.ranks.distributed and not self.sharded and self.forward is self.model
        self.optimizer, self.param_names = build_optimizer(self.model, lr, betas, weight_decay, device)
        self.step = 0
        self.last_lr = schedule.lr(lr, 0)
        self.images_per_s = float("nan")  # steady-state throughput, when the step reports "images"

    # --- start: resume, or initial weights ---------------------------------------------------------------------
    def start(self, init: Path | None = None) -> None:
        """Resume from out_dir's latest checkpoint if there is one, else load `init` (a stage output or checkpoint
        folder: its model weights, and its EMA into this EMA; or a diffusers weights folder) when given. A LoRA
        trainer's starting point is its base, loaded at construction: it takes no init."""
        ckpt = latest_checkpoint(self.out_dir / "checkpoints")
        if ckpt is not None:
            saved = load_training_state(ckpt, self.model, self.ema, self.optimizer, self.param_names, self.sharded,
                                        weights=self.weights)
            self.step = int(saved["step"])
            for key, obj in self.state.items():
                _set_state(obj, saved["state"][key])
            torch.set_rng_state(saved["torch_rng"])
            if self.ranks.is_main:
                tqdm.write(f"{self.name}: resuming from {ckpt} at step {self.step}")
        elif init is not None and self.lora is None:
            load_generator(Path(init), self.model, "model")
            if self.ema is not None:
                load_generator(Path(init), self.ema, "ema")

    # --- checkpoints -------------------------------------------------------------------------------------------
    def save(self, final: bool = False, keep: int | None = None) -> Path:
        """Collective under torchrun (see kiln.checkpoint.save_training_state). keep: checkpoints kept, this one
        included (default cadence.keep_checkpoints)."""
        state = {"step": self.step, "state": {key: _get_state(obj) for key, obj in self.state.items()},
                 "torch_rng": torch.get_rng_state()}
        keep = self.cfg.cadence.keep_checkpoints if keep is None else keep
        return save_training_state(self.out_dir / "checkpoints", self.step, self.model, self.ema, self.optimizer,
                                   state, self.meta, keep, self.sharded, final, weights=self.weights)

    def whole(self, module: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
        """`module` (the model or the EMA) whole on rank 0, for sampling; None on other ranks. Collective under
        FSDP2: gathers the shards into a fresh unsharded copy made by build()."""
        if not self.sharded:
            return module if self.ranks.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ranks.is_main:
            return None
        whole = build()
        whole.load_state_dict(state)
        return whole.to(self.device).requires_grad_(False).eval()

    @contextlib.contextmanager
    def ema_model(self, build: Callable[[], torch.nn.Module]):
        """The EMA weights as a whole model on rank 0 (None on other ranks), for sampling during training. Collective
        under FSDP2 (see whole); a LoRA trainer swaps the EMA adapter in for the duration."""
        if self.lora is not None and self.sharded:  # gather the EMA adapter; rank 0 fuses it into a whole base
            adapter = whole_state(self.ema)
            if not self.ranks.is_main:
                yield None
                return
            whole = build()
            load_generator(self.base[0], whole, self.base[1])
            yield fuse_adapter(whole, self.lora, adapter).to(self.device).requires_grad_(False).eval()
        elif self.lora is not None:
            with self.ema.swapped_in() as model:
                yield model if self.ranks.is_main else None
        else:
            yield self.whole(self.ema, build)

    # --- one optimizer step --------------------------------------------------------------------------------------
    def train_step(self, forward_backward: Callable[[object], dict], batch) -> dict:
        """Zero grads, the stage's forward and backward(s), then check, average, clip and step. Returns the
        step's metrics (floats) with its grad_norm."""
        self.optimizer.zero_grad(set_to_none=True)
        metrics = forward_backward(batch)
        loss = distributed.mean_across(torch.as_tensor(metrics["loss"], device=self.device)).item()
        if not math.isfinite(loss):  # before the step: the weights stay those of the last good step
            raise FloatingPointError(f"{self.name}: loss is {loss} at step {self.step}; last good checkpoint: "
                                     f"{latest_checkpoint(self.out_dir / 'checkpoints')}")
        if self.average_by_hand:
            distributed.average_gradients(self.model)
        grad_norm = None
        if self.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
        self.last_lr = self.schedule.lr(self.peak_lr, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        self.optimizer.step()
        if self.ema is not None:
            ema_update(self.ema, self.weights, self.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = {**metrics, "loss": loss}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    # --- the loop --------------------------------------------------------------------------------------------
    def fit(self, forward_backward: Callable[[object], dict], batches: Callable[[], Iterator],
            sample: Callable[[int], None] | None = None, save_final: bool = True) -> dict[str, float]:
        """Train from self.step to self.steps. `batches()` is called once, after start(), so a resumed stage's data
        iterator can begin where it stopped. forward_backward(batch) -> {"loss": scalar, other metrics: floats,
        0-d tensors or (total, count) pairs pooled over the log window; "images": samples in the step, for
        throughput}. sample(step): called every cadence.sample_every steps and at the end. Returns the last logged
        window's means."""
        cadence = self.cfg.cadence
        window: dict[str, list[float]] = {}
        window_start, images_in_window, images_seen, log_points = time.perf_counter(), 0, 0, []
        last: dict[str, float] = {}
        bar = tqdm(total=self.steps, initial=self.step, desc=self.name, unit="step", disable=not self.ranks.is_main)
        iterator = batches()
        with Preemption() as preemption:  # SIGTERM: checkpoint at the end of this step, then stop
            while self.step < self.steps:
                metrics = self.train_step(forward_backward, next(iterator))
                images = int(metrics.pop("images", 0))
                images_in_window += images
                images_seen += images
                for key, value in metrics.items():
                    total, count = value if isinstance(value, tuple) else (float(value), 1)
                    acc = window.setdefault(key, [0.0, 0])
                    acc[0] += float(total)
                    acc[1] += count
                step = self.step
                bar.update(1)
                if step % self.log_every == 0 or step == self.steps:
                    now = time.perf_counter()
                    log_points.append((now, images_seen))
                    last = {key: total / count for key, (total, count) in window.items() if count}
                    logged = {f"{self.log_prefix}/{key}": value for key, value in last.items()}
                    logged[f"{self.log_prefix}/lr"] = self.last_lr
                    if images_in_window:
                        logged[f"{self.log_prefix}/images_per_s"] = images_in_window / (now - window_start)
                    self.tracker.log_metrics(logged, step=step)
                    bar.set_postfix({key: f"{last[key]:.4g}" for key in self.postfix if key in last})
                    window, window_start, images_in_window = {}, now, 0
                if step % cadence.checkpoint_every == 0 and step < self.steps:
                    self.save()
                if sample is not None and (step % cadence.sample_every == 0 or step == self.steps):
                    sample(step)
                # Every process checkpoints at the same step when any of them was signalled.
                if distributed.any_rank(preemption.requested, self.device) and step < self.steps:
                    path = self.save()
                    raise Preempted(f"{self.name}: stopped by SIGTERM at step {step}; checkpoint {path} "
                                    f"(rerun to resume)")
        bar.close()
        if len(log_points) > 1:
            (t0, n0), (t1, n1) = log_points[0], log_points[-1]
            self.images_per_s = (n1 - n0) / (t1 - t0) if n1 > n0 else float("nan")
        if save_final:
            final = self.save(final=True)
            self.tracker.set_tags({"kiln.checkpoint": str(final.resolve())})
        return last
