"""The model factory: one function builds the backbone from config."""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel


def build_transformer(model_cfg, latent_channels: int, text_dim: int, device: str | torch.device = "cpu"):
    """diffusers' QwenImageTransformer2DModel (double-stream MMDiT blocks, MSRoPE) from a ModelConfig.

    Inputs are packed latents: (B, h/p * w/p, C * p * p) tokens; outputs the velocity in the same layout.
    `device="meta"` builds the structure without allocating weights (used to count the 20B preset).
    """
    patch = model_cfg.patch_size
    with torch.device(device):
        model = QwenImageTransformer2DModel(
            patch_size=patch,
            in_channels=latent_channels * patch * patch,
            out_channels=latent_channels,
            num_layers=model_cfg.num_layers,
            attention_head_dim=model_cfg.attention_head_dim,
            num_attention_heads=model_cfg.num_attention_heads,
            joint_attention_dim=text_dim,
            axes_dims_rope=tuple(model_cfg.axes_dims_rope),
        )
    if model_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
