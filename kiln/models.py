"""The model factory: one function builds every backbone from config, one function calls it.

Backbones come from diffusers, not rewritten: Qwen-Image's MMDiT with MSRoPE (`QwenImageTransformer2DModel`), SD3's
MMDiT (`SD3Transformer2DModel`), a DiT with cross-attention to the text (PixArt-alpha's `PixArtTransformer2DModel`)
and SD1/SD2's text-conditioned U-Net (`UNet2DConditionModel`). The rest of the project sees them all through
`predict(model, x, t, text, mask, grid)` on packed latent tokens, so objectives and samplers know nothing about the
architecture (DiT's split).
"""

from __future__ import annotations

import math

import torch
from diffusers import (PixArtTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel,
                       UNet2DConditionModel)

from kiln.geometry import TOKEN_PATCH, token_grid


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, C * 4): 2x2 latent patches as tokens, QwenImagePipeline's layout."""
    b, c, h, w = latents.shape
    rows, cols = token_grid(h, w)
    x = latents.view(b, c, rows, TOKEN_PATCH, cols, TOKEN_PATCH).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, rows * cols, c * TOKEN_PATCH**2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, C * 4) -> (B, C, h, w); h, w are latent sizes."""
    b, _, d = tokens.shape
    rows, cols = token_grid(h, w)
    channels = d // TOKEN_PATCH**2
    x = tokens.view(b, rows, cols, channels, TOKEN_PATCH, TOKEN_PATCH)  # (B, h/2, w/2, C, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, channels, h, w)


# Largest token grid side SD3's learned-size positional table covers (a 2048 px image: 256 latents / patch 2).
SD3_POS_EMBED_MAX = 128


def build_backbone(model_cfg, latent_channels: int, text_dim: int, device: str | torch.device = "cpu"):
    """The backbone `model_cfg.kind` names, sized by model_cfg, for latents of `latent_channels` and text
    embeddings of `text_dim`. `device="meta"` builds the structure without allocating weights (used to count the 20B
    preset)."""
    kind, patch = model_cfg.kind, model_cfg.patch_size
    heads, head_dim = model_cfg.num_attention_heads, model_cfg.attention_head_dim
    with torch.device(device):
        if kind == "qwen-image":
            model = QwenImageTransformer2DModel(
                patch_size=patch, in_channels=latent_channels * patch * patch, out_channels=latent_channels,
                num_layers=model_cfg.num_layers, attention_head_dim=head_dim, num_attention_heads=heads,
                joint_attention_dim=text_dim, axes_dims_rope=tuple(model_cfg.axes_dims_rope))
        elif kind == "sd3":
            model = SD3Transformer2DModel(
                sample_size=64, patch_size=patch, in_channels=latent_channels, out_channels=latent_channels,
                num_layers=model_cfg.num_layers, attention_head_dim=head_dim, num_attention_heads=heads,
                joint_attention_dim=text_dim, caption_projection_dim=heads * head_dim,
                pooled_projection_dim=text_dim, pos_embed_max_size=SD3_POS_EMBED_MAX)
        elif kind == "dit":
            model = PixArtTransformer2DModel(
                num_attention_heads=heads, attention_head_dim=head_dim, in_channels=latent_channels,
                out_channels=latent_channels, num_layers=model_cfg.num_layers, patch_size=patch, sample_size=64,
                cross_attention_dim=heads * head_dim, caption_channels=text_dim, norm_num_groups=1,
                use_additional_conditions=False)
        else:  # unet
            levels = len(model_cfg.block_out_channels)
            model = UNet2DConditionModel(
                in_channels=latent_channels, out_channels=latent_channels,
                block_out_channels=tuple(model_cfg.block_out_channels), layers_per_block=model_cfg.layers_per_block,
                down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
                cross_attention_dim=text_dim,
                attention_head_dim=heads,  # diffusers' historical name: the number of heads
                norm_num_groups=_groups(model_cfg.block_out_channels))
            if not model_cfg.unet_output_norm:  # diffusers' forward skips norm and activation when this is None
                model.conv_norm_out = model.conv_act = None
    if model_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _groups(channels: list[int]) -> int:
    """GroupNorm groups for a U-Net: the largest divisor of every level's channels up to diffusers' default 32."""
    common = math.gcd(*channels)
    return max(d for d in range(1, 33) if common % d == 0)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone behind a DDP wrapper or a LoRA policy's reference view (kiln.adapters.BaseModel)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model.policy[0] if hasattr(model, "policy") else model


def predict(model, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, grid) -> torch.Tensor:
    """The only place that calls a backbone. x: (B, N, C*4) packed latent tokens, t: (B,) in [0, 1] (0 data,
    1 noise), text: (B, L, D), mask: (B, L) bool, grid: (h/2, w/2) token grid of this batch (one shape per batch).
    Returns the network's prediction in the same packed layout (what it means is the objective's business)."""
    base = _unwrapped(model)
    if not isinstance(base, (SD3Transformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel)):
        # Qwen-Image's MMDiT reads the packed tokens and scales t by 1000 itself.
        img_shapes = [[(1, grid[0], grid[1])]] * x.shape[0]
        return model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                     timestep=t.to(x.dtype), img_shapes=img_shapes, return_dict=False)[0]
    latents = unpack(x, TOKEN_PATCH * grid[0], TOKEN_PATCH * grid[1])  # (B, C, h, w)
    steps = (t * 1000).to(x.dtype)  # the others take diffusers' 0..1000 timesteps
    if isinstance(base, SD3Transformer2DModel):
        # SD3 attends to every text token (no mask): padding is zeroed, and the pooled vector (CLIP's in SD3) is the
        # mean of the caption's tokens.
        weights = mask.to(text.dtype)[..., None]  # (B, L, 1)
        pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
        out = model(hidden_states=latents, encoder_hidden_states=text * weights, pooled_projections=pooled,
                    timestep=steps, return_dict=False)[0]
    elif isinstance(base, PixArtTransformer2DModel):
        out = model(hidden_states=latents, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=steps,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    else:
        out = model(latents, steps, encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=False)[0]
    return pack(out)  # (B, N, C*4)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Per backbone, what adaLN-Zero zeroes: layers whose names end with the first entries (every block's modulation)
# and the layers named by the second (the final modulation and output projection). PixArt's blocks modulate from a
# learned table plus one shared projection, so only its output projection starts at zero.
ADALN_ZERO = {
    QwenImageTransformer2DModel: (("img_mod.1", "txt_mod.1"), ("norm_out.linear", "proj_out")),
    SD3Transformer2DModel: (("norm1.linear", "norm1_context.linear"), ("norm_out.linear", "proj_out")),
    PixArtTransformer2DModel: ((), ("proj_out",)),
}


def init_adaln_zero(model: torch.nn.Module) -> torch.nn.Module:
    """DiT's adaLN-Zero initialisation for a transformer trained from scratch: every modulation (shift, scale, gate)
    and the output projection start at zero, so each block starts as the identity and the first prediction is zero.
    diffusers leaves these at PyTorch's default init, which is fine for loading pretrained weights; DiT (Peebles &
    Xie 2023, section 3.2) found adaLN-Zero trains best from scratch. A U-Net keeps diffusers' init (no adaLN)."""
    suffixes, names = next((v for cls, v in ADALN_ZERO.items() if isinstance(model, cls)), ((), ()))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (name in names or suffixes and name.endswith(suffixes)):
            torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    return model
