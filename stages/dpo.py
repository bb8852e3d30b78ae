"""DPO stage: Diffusion-DPO (kiln/dpo.py) on the preference pairs, from the previous stage's weights, with that
stage frozen as the reference model. Each step draws a batch of pairs, one t and one noise per pair shared by its
chosen and rejected latents, and lowers the policy's flow-matching error on the chosen image relative to the
rejected one, measured against the reference.

Under torchrun each of N processes takes per_device_train_batch_size pairs of every global batch of N times that
(TRL's meaning), with t and noise drawn for the whole global batch and sliced: N processes train as one would on
the global batch."""

from __future__ import annotations

from pathlib import Path

import torch

from data.shards import BucketBatches
from kiln import distributed, seeding
from kiln.dpo import diffusion_dpo_batch_loss
from kiln.flow import sample_timesteps
from kiln.geometry import token_grid, vae_factor
from kiln.stage_io import StageResult, hash_files
from stages.common import training_device
from stages.policy import policy_trainer

PAIR_FIELDS = ("chosen", "rejected", "text_emb", "text_mask")


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir = Path(out_dir)
    dcfg = cfg.dpo
    generator = torch.Generator(device=training_device(cfg)).manual_seed(seeding.dpo(cfg.seed))
    trainer, reference = policy_trainer(
        cfg, "dpo", Path(inputs["init"]), out_dir, tracker, steps=dcfg.max_steps, learning_rate=dcfg.learning_rate,
        warmup_steps=dcfg.warmup_steps, max_grad_norm=dcfg.max_grad_norm, state={"generator": generator},
        postfix=("loss", "rewards/accuracies"))
    device, ranks = trainer.device, trainer.ranks
    trainer.start()
    shards = Path(inputs["pairs"]) / "shards"
    global_batch = dcfg.per_device_train_batch_size * ranks.world_size
    # Several processes split every batch evenly, so a last partial batch of an epoch is dropped there.
    drop_last = ranks.distributed
    per_epoch = len(BucketBatches(shards, global_batch, seed=cfg.seed, fields=PAIR_FIELDS, drop_last=drop_last))
    # One batch per step, so step k is batch k % per_epoch of epoch k // per_epoch: a resumed stage continues there.
    loader = BucketBatches(shards, global_batch, seed=cfg.seed, fields=PAIR_FIELDS, drop_last=drop_last,
                           cache_in_memory=True,
                           start={"epoch": trainer.step // per_epoch, "batch": trainer.step % per_epoch})

    def forward_backward(batch: dict) -> dict:
        chosen = batch["chosen"].to(device)  # (B, C, h, w)
        rejected = batch["rejected"].to(device)
        text, mask = batch["text_emb"].to(device), batch["text_mask"].to(device)
        b, _, h, w = chosen.shape
        trainer.meta["resolution"] = vae_factor(cfg.vae) * h
        n = global_batch if ranks.distributed else b  # draws for the global batch, this process's rows kept
        grid = token_grid(h, w)
        t = sample_timesteps(n, grid[0] * grid[1], cfg.objective, cfg.scheduler, generator, device)[loader.rows]
        # (B,) and (B, C, h, w): one t and one noise per pair, shared by chosen and rejected
        noise = torch.randn((n, *chosen.shape[1:]), generator=generator, device=device)[loader.rows]
        loss, stats = diffusion_dpo_batch_loss(trainer.forward, reference, chosen, rejected, text, mask, t, noise,
                                               dcfg.beta)
        loss.backward()
        return {"loss": loss.detach(),
                **{k: distributed.mean_across(torch.as_tensor(v, device=device)) for k, v in stats.items()}}

    trainer.fit(forward_backward, loader.batches_forever)
    return StageResult("dpo", out_dir, {"steps": trainer.step}, hash_files(out_dir / "checkpoints"))
