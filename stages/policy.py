"""What the preference-optimisation stages (DPO, GRPO) share: a trainable policy started from a stage's weights and a
frozen copy of it as the reference model, trained by kiln/trainer.py. A stage in lora.stages trains an adapter over
those weights, and its reference is the policy with the adapter switched off (no second copy of the weights).

Under torchrun each process holds the policy whole and the trainer averages gradients once per optimizer step
("ddp"), or policy and reference are sharded with FSDP2 ("fsdp")."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from kiln import distributed
from kiln.adapters import BaseModel
from kiln.geometry import latent_channels
from kiln.models import build_backbone
from kiln.weights import load_generator
from kiln.trainer import Schedule, Trainer
from stages.common import training_device

# Policy optimisation keeps Adam's usual second-moment decay (pretraining's 0.99 suits its large, noisy batches).
POLICY_BETAS = (0.9, 0.999)
POLICY_WEIGHT_DECAY = 1e-4


def policy_trainer(cfg, name: str, init_dir: Path, out_dir: Path, tracker, *, steps: int, learning_rate: float,
                   warmup_steps: int, max_grad_norm: float, state: dict, log_every: int | None = None,
                   postfix: tuple[str, ...] = ("loss",)) -> tuple[Trainer, torch.nn.Module]:
    """(trainer of the policy, frozen reference): both start from init_dir's weights (its EMA where it has one).
    The trainer resumes from out_dir's latest checkpoint when start() is called; the reference stays the init."""
    device = training_device(cfg)
    model = build_backbone(cfg.model, latent_channels(cfg.vae), cfg.text_encoder.dim)
    lora = cfg.lora if cfg.uses_lora(name) else None
    if lora is None:
        load_generator(init_dir, model, "ema")  # its EMA where it has one
        reference = copy.deepcopy(model).to(device).requires_grad_(False).eval()
    trainer = Trainer(name, model, cfg, steps=steps, lr=learning_rate,
                      schedule=Schedule(warmup=max(1, warmup_steps), decay="constant"), out_dir=out_dir,
                      tracker=tracker, device=device, betas=POLICY_BETAS, weight_decay=POLICY_WEIGHT_DECAY,
                      grad_clip=max_grad_norm, state=state, one_backward=False, log_every=log_every,
                      postfix=postfix, meta={"kind": "transformer", "latent_channels": latent_channels(cfg.vae)},
                      lora=lora, base=(Path(init_dir), "ema") if lora is not None else None)
    trainer.model.train()
    if lora is not None:
        reference = BaseModel(trainer.model)  # sharded with the policy under FSDP2
    elif trainer.sharded:
        distributed.shard(reference)
    return trainer, reference
