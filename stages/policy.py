"""What the preference-optimisation stages (DPO, GRPO) share: a trainable policy started from a stage's weights, a
frozen copy of it as the reference model, and checkpoints that let either stage resume exactly.

Under torchrun (kiln.distributed) each process holds the policy whole and gradients are averaged once per
optimizer step ("ddp"), or policy and reference are sharded with FSDP2 ("fsdp"); checkpoints as in the pretrain
trainer (whole from rank 0, or sharded), loadable under any number of processes."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from kiln import distributed
from kiln.checkpoint import latest_checkpoint, load_training_state, load_weights, resolve_checkpoint, save_training_state
from kiln.models import build_backbone


class Policy:
    """policy (trainable) and reference (frozen) transformers, both started from `init_dir`'s weights (its EMA
    where it has one), with AdamW. save()/resume() cover weights, optimizer, step and the stage's RNG."""

    def __init__(self, cfg, init_dir: Path, device, learning_rate: float, warmup_steps: int = 0):
        self.ranks = distributed.ranks()
        self.device = device = distributed.device_for(torch.device(device), self.ranks)
        ckpt = resolve_checkpoint(init_dir)
        self.model = build_backbone(cfg.model, cfg.vae.z_dim, cfg.text_encoder.dim)
        load_weights(ckpt, self.model, "ema" if (ckpt / "ema.safetensors").exists() else "model")
        self.model.to(device).train()
        self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.sharded = self.ranks.distributed and cfg.distributed.strategy == "fsdp"
        if self.sharded:
            distributed.shard(self.model)
            distributed.shard(self.reference)
        self.param_names = [name for name, _ in self.model.named_parameters()]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate, betas=(0.9, 0.999),
                                           weight_decay=1e-4, fused=device.type == "cuda")
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
        if not self.sharded:  # FSDP2 reduce-scatters in backward; whole replicas average here (no-op alone)
            distributed.average_gradients(self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return grad_norm

    def save(self, out_dir: Path, resolution: int, generator: torch.Generator, keep: int = 2,
             final: bool = False) -> Path:
        state = {"schedule": self.schedule.state_dict(), "step": self.step_count, "generator": generator.get_state(),
                 "torch_rng": torch.get_rng_state()}
        meta = {"kind": "transformer", "resolution": resolution, "latent_channels": self.model.config.out_channels}
        return save_training_state(Path(out_dir) / "checkpoints", self.step_count, self.model, None, self.optimizer,
                                   state, meta, keep, self.sharded, final)

    def resume(self, out_dir: Path, generator: torch.Generator) -> bool:
        """Continue from out_dir's latest checkpoint if there is one (the reference stays the init weights)."""
        ckpt = latest_checkpoint(Path(out_dir) / "checkpoints")
        if ckpt is None:
            return False
        state = load_training_state(ckpt, self.model, None, self.optimizer, self.param_names, self.sharded)
        self.schedule.load_state_dict(state["schedule"])
        self.step_count = int(state["step"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return True
