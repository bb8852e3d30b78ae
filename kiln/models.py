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


def init_adaln_zero(model: torch.nn.Module) -> torch.nn.Module:
    """DiT's adaLN-Zero initialisation for a model trained from scratch: every modulation (shift, scale, gate) and
    the output projection start at zero, so each block starts as the identity and the first prediction is zero.
    diffusers leaves these at PyTorch's default init, which is fine for loading pretrained weights; DiT (Peebles &
    Xie 2023, section 3.2) found adaLN-Zero trains best from scratch."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (
            name.endswith(("img_mod.1", "txt_mod.1")) or name in ("norm_out.linear", "proj_out")
        ):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return model
