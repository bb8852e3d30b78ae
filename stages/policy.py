"""What the preference-optimisation stages (DPO, GRPO) share: a trainable policy started from a stage's weights, a
frozen copy of it as the reference model, and checkpoints that let either stage resume exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from kiln.checkpoint import latest_checkpoint, load_trainer_state, load_weights, resolve_checkpoint, save_checkpoint
from kiln.models import build_transformer


class Policy:
    """policy (trainable) and reference (frozen) transformers, both started from `init_dir`'s weights (its EMA
    where it has one), with AdamW. save()/resume() cover weights, optimizer, step and the stage's RNG."""

    def __init__(self, cfg, init_dir: Path, device, learning_rate: float, warmup_steps: int = 0):
        ckpt = resolve_checkpoint(init_dir)
        self.model = build_transformer(cfg.model, cfg.vae.z_dim, cfg.text_encoder.dim)
        load_weights(ckpt, self.model, "ema" if (ckpt / "ema.safetensors").exists() else "model")
        self.model.to(device).train()
        self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate, betas=(0.9, 0.999),
                                           weight_decay=1e-4, fused=torch.device(device).type == "cuda")
        warmup = max(1, warmup_steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.step_count = 0

    def update(self, loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """Backward, clip, step. Returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self.optimizer_step(max_grad_norm)

    def optimizer_step(self, max_grad_norm: float) -> torch.Tensor:
        """Clip and step on gradients already accumulated (zeroes them after)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return grad_norm

    def save(self, out_dir: Path, resolution: int, generator: torch.Generator, keep: int = 2) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "step": self.step_count, "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
        return save_checkpoint(Path(out_dir) / "checkpoints", self.step_count, self.model, None, state,
                               meta={"kind": "transformer", "resolution": resolution,
                                     "latent_channels": self.model.config.out_channels}, keep=keep)

    def resume(self, out_dir: Path, generator: torch.Generator) -> bool:
        """Continue from out_dir's latest checkpoint if there is one (the reference stays the init weights)."""
        ckpt = latest_checkpoint(Path(out_dir) / "checkpoints")
        if ckpt is None:
            return False
        load_weights(ckpt, self.model, "model")
        state = load_trainer_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step_count = int(state["step"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return True
