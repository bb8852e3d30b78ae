"""DPO stage: Diffusion-DPO (kiln/dpo.py) on the preference pairs, from the previous stage's weights, with that
stage frozen as the reference model. Each step draws a batch of pairs, one t and one noise per pair shared by its
chosen and rejected latents, and lowers the policy's flow-matching error on the chosen image relative to the
rejected one, measured against the reference.

Under torchrun each of N processes takes per_device_train_batch_size pairs of every global batch of N times that
(TRL's meaning), with t and noise drawn for the whole global batch and sliced: N processes train as one would on
the global batch."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.shards import BucketBatches
from kiln import distributed
from kiln.dpo import diffusion_dpo_batch_loss
from kiln.flow import sample_timesteps
from kiln.preemption import Preempted, Preemption
from kiln.stage_io import StageResult, hash_files
from stages.common import pick_device
from stages.policy import Policy

PAIR_FIELDS = ("chosen", "rejected", "text_emb", "text_mask")


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir = Path(out_dir)
    dcfg = cfg.dpo
    policy = Policy(cfg, Path(inputs["init"]), pick_device(cfg.device), dcfg.learning_rate, dcfg.warmup_steps)
    device, ranks = policy.device, policy.ranks
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + 101)
    if policy.resume(out_dir, generator):
        tqdm.write(f"dpo: resuming at step {policy.step_count}")
    shards = Path(inputs["pairs"]) / "shards"
    global_batch = dcfg.per_device_train_batch_size * ranks.world_size
    # Several processes split every batch evenly, so a last partial batch of an epoch is dropped there.
    drop_last = ranks.distributed
    per_epoch = len(BucketBatches(shards, global_batch, seed=cfg.seed, fields=PAIR_FIELDS, drop_last=drop_last))
    # One batch per step, so step k is batch k % per_epoch of epoch k // per_epoch: a resumed stage continues there.
    loader = BucketBatches(shards, global_batch, seed=cfg.seed, fields=PAIR_FIELDS,
                           drop_last=drop_last, cache_in_memory=True,
                           start={"epoch": policy.step_count // per_epoch, "batch": policy.step_count % per_epoch})
    batches = loader.batches_forever()
    resolution = None
    stats_sum: dict[str, float] = {}
    n_logged = 0
    bar = tqdm(total=dcfg.max_steps, initial=policy.step_count, desc="dpo", unit="step", disable=not ranks.is_main)
    with Preemption() as preemption:  # SIGTERM: checkpoint at the end of this step, then stop
        while policy.step_count < dcfg.max_steps:
            batch = next(batches)
            chosen = batch["chosen"].to(device)  # (B, C, h, w)
            rejected = batch["rejected"].to(device)
            text, mask = batch["text_emb"].to(device), batch["text_mask"].to(device)
            b, _, h, w = chosen.shape
            resolution = 8 * h
            n = global_batch if ranks.distributed else b  # draws for the global batch, this process's rows kept
            t = sample_timesteps(n, (h // 2) * (w // 2), cfg.objective, cfg.scheduler, generator, device)[loader.rows]
            # (B,) and (B, C, h, w): one t and one noise per pair, shared by chosen and rejected
            noise = torch.randn((n, *chosen.shape[1:]), generator=generator, device=device)[loader.rows]
            loss, stats = diffusion_dpo_batch_loss(policy.model, policy.reference, chosen, rejected, text, mask, t, noise,
                                                   dcfg.beta)
            stats = {k: distributed.mean_across(torch.as_tensor(v, device=device)) for k, v in stats.items()}
            if not math.isfinite(distributed.mean_across(loss).item()):
                raise FloatingPointError(f"dpo: loss is {loss.item()} at step {policy.step_count}")
            grad_norm = policy.update(loss, dcfg.max_grad_norm)
            bar.update(1)
            for key, value in {"loss": distributed.mean_across(loss), "grad_norm": grad_norm, **stats}.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(value)
            n_logged += 1
            step = policy.step_count
            if step % cfg.cadence.log_every == 0 or step == dcfg.max_steps:
                means = {f"train/{k}": v / n_logged for k, v in stats_sum.items()}
                tracker.log_metrics({**means, "train/lr": policy.schedule.get_last_lr()[0]}, step=step)
                bar.set_postfix(loss=f"{means['train/loss']:.4f}", acc=f"{means['train/rewards/accuracies']:.2f}")
                stats_sum, n_logged = {}, 0
            if step % cfg.cadence.checkpoint_every == 0 and step < dcfg.max_steps:
                policy.save(out_dir, resolution, generator)
            if distributed.any_rank(preemption.requested, device) and step < dcfg.max_steps:
                path = policy.save(out_dir, resolution, generator)
                raise Preempted(f"dpo: stopped by SIGTERM at step {step}; checkpoint {path} (rerun to resume)")
    bar.close()
    final = policy.save(out_dir, resolution or cfg.train.rungs[-1].resolution, generator, final=True)
    tracker.set_tags({"kiln.checkpoint": str(final.resolve())})
    return StageResult("dpo", out_dir, {"steps": policy.step_count}, hash_files(out_dir / "checkpoints"))
