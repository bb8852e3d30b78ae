"""Image geometry, derived in one place: pixels -> VAE latents -> tokens.

The VAE divides each image side by its spatial factor. The latents then become tokens as TOKEN_PATCH x TOKEN_PATCH
patches, QwenImagePipeline's packing, which every objective and sampler here works on (kiln/models.py pack).
Qwen-Image's transformer reads those tokens as its own patches, so its model.patch_size must be TOKEN_PATCH; SD3's
MMDiT and the DiT unpack them and patchify with their own model.patch_size; the U-Net takes whole latents.
"""

from __future__ import annotations

import math

TOKEN_PATCH = 2
PRETRAINED_VAE_FACTOR = 8  # Qwen-Image's VAE: three 2x downsamplings


def vae_factor(vae_cfg) -> int:
    """Pixels per latent along each side: AutoencoderKLQwenImage downsamples 2x between consecutive dim_mult
    levels (QwenImagePipeline's vae_scale_factor counts the same); a pretrained VAE is Qwen-Image's 8x."""
    factor = PRETRAINED_VAE_FACTOR if vae_cfg.pretrained else 2 ** (len(vae_cfg.dim_mult) - 1)
    return factor * vae_cfg.space_to_depth


def latent_channels(vae_cfg) -> int:
    """Channels of the latents the transformer sees: the VAE's z_dim times the pixels vae.space_to_depth folds."""
    return vae_cfg.z_dim * vae_cfg.space_to_depth**2


def token_grid(h: int, w: int) -> tuple[int, int]:
    """Latent (h, w) -> the (rows, columns) of its token grid."""
    return h // TOKEN_PATCH, w // TOKEN_PATCH


def size_multiple(cfg) -> int:
    """Pixels every image side must be a multiple of, for a KilnConfig: the VAE factor times the token patch (and
    the backbone's own patch, where it patchifies the unpacked latents itself)."""
    patch = TOKEN_PATCH if cfg.model.kind == "unet" else math.lcm(TOKEN_PATCH, cfg.model.patch_size)
    return vae_factor(cfg.vae) * patch
