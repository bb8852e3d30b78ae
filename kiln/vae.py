"""diffusers' AutoencoderKLQwenImage (2x spatial compression per level: Qwen-Image's is 8x, kiln/geometry.py
derives the factor) and the latent normalisation Qwen-Image uses.

Latents the transformer sees are normalised per channel: z_norm = (z - mean) / std, with mean/std stored in the
VAE's own config (latents_mean / latents_std), exactly as QwenImagePipeline undoes them before decoding.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d


class SingleFrameCausalConv3d(QwenImageCausalConv3d):
    """The same causal 3D conv, with a fast path for what images are: one frame and no cached frames.

    Causal padding puts k_t - 1 zero frames before a lone frame, so only the kernel's last temporal slice ever
    meets data: the output equals a 2D conv with weight[:, :, -1], at 1/k_t of the FLOPs (1/3 for 3x3x3 kernels).
    Anything else (video, cached chunks, temporal strides) goes through diffusers' own forward.
    """

    def forward(self, x, cache_x=None):
        if x.shape[2] == 1 and cache_x is None and self.stride[0] == 1 and self._padding[4] == self.kernel_size[0] - 1:
            pad_w, _, pad_h, _ = self._padding[:4]
            out = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (pad_h, pad_w))
            return out[:, :, None]  # (B, C_out, 1, H', W')
        return super().forward(x, cache_x)


def use_single_frame_convs(vae: AutoencoderKLQwenImage) -> AutoencoderKLQwenImage:
    """Switch every causal conv of `vae` to SingleFrameCausalConv3d in place (same parameters and state dict)."""
    for module in vae.modules():
        if type(module) is QwenImageCausalConv3d:
            module.__class__ = SingleFrameCausalConv3d
    return vae


def build_vae(cfg) -> AutoencoderKLQwenImage:
    """From a VaeConfig: load the pretrained one it names, or build a fresh small one to train."""
    if cfg.pretrained:
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        return _with_fold(use_single_frame_convs(AutoencoderKLQwenImage.from_pretrained(cfg.pretrained, **kwargs)), cfg)
    vae = AutoencoderKLQwenImage(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=[False] * (len(cfg.dim_mult) - 1),  # images only: no temporal compression
        latents_mean=[0.0] * cfg.z_dim,
        latents_std=[1.0] * cfg.z_dim,
    )
    return _with_fold(use_single_frame_convs(_with_encoder(vae, cfg.encoder)), cfg)


def _with_fold(vae, cfg):
    vae.space_to_depth = cfg.space_to_depth if cfg is not None else 1  # read by encode_images / decode_latents
    return vae


def _linear_encode(self, x: torch.Tensor) -> torch.Tensor:
    """x (B, 3, 1, H, W) -> posterior parameters (B, 2 z_dim, 1, H/f, W/f), linear in x."""
    return self.linear_encoder(x[:, :, 0])[:, :, None]


def _saved_encoder(ckpt: Path) -> str:
    """The vae.encoder a saved VAE was trained with, read from its weight names (a linear one has no encoder network)."""
    from safetensors import safe_open

    files = [Path(ckpt) / "model.safetensors"] + sorted((Path(ckpt) / "model").glob("*.safetensors"))  # one or shards
    for file in filter(Path.exists, files):
        with safe_open(str(file), "pt") as weights:
            if "linear_encoder.weight" in weights.keys():
                return "linear"
    return "qwen-image"


def _with_encoder(vae: AutoencoderKLQwenImage, encoder: str) -> AutoencoderKLQwenImage:
    """encoder "linear": swap the encoder network (and its 1x1 quant_conv) for one strided convolution."""
    if encoder == "qwen-image":
        return vae
    factor = 2 ** (len(vae.config.dim_mult) - 1)
    vae.encoder, vae.quant_conv = nn.Module(), nn.Identity()  # empty: their weights would be saved and never used
    vae.linear_encoder = nn.Conv2d(3, 2 * vae.config.z_dim, kernel_size=2 * factor, stride=factor, padding=factor // 2)
    vae._encode = types.MethodType(_linear_encode, vae)
    return vae


def load_vae(vae_dir: Path, vae_cfg=None) -> AutoencoderKLQwenImage:
    """The VAE a `vae` stage produced (its final checkpoint), or the pretrained one the config names."""
    from kiln.checkpoint import load_weights, resolve_checkpoint

    if vae_cfg is not None and vae_cfg.pretrained:
        return build_vae(vae_cfg)
    ckpt = resolve_checkpoint(Path(vae_dir) / "checkpoints")
    encoder = _saved_encoder(ckpt)
    if vae_cfg is not None and vae_cfg.encoder != encoder:
        raise ValueError(f"vae: {ckpt} holds a VAE with the {encoder!r} encoder, but the config says vae.encoder="
                         f"{vae_cfg.encoder!r}; set vae.encoder={encoder} to use it")
    vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(ckpt))
    vae = use_single_frame_convs(_with_encoder(vae, encoder))
    load_weights(ckpt, vae)
    return _with_fold(vae, vae_cfg).eval()


@functools.lru_cache(maxsize=2)
def _cached_vae(vae_dir: str, vae_cfg_json: str, device: str):
    from kiln.config import VaeConfig

    return load_vae(Path(vae_dir), VaeConfig.model_validate_json(vae_cfg_json)).to(device).eval()


def vae_for(cfg, vae_dir: Path, device):
    """One VAE per process, VAE folder, config and device (every sampling call of a stage shares it)."""
    return _cached_vae(str(vae_dir), cfg.vae.model_dump_json(), str(device))


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f), f the VAE factor (8: Qwen-Image's)."""
    dist = vae.encode(images[:, :, None].to(vae.dtype)).latent_dist  # the VAE is 3D: (B, 3, T=1, H, W)
    z = (dist.sample() if sample else dist.mode())[:, :, 0].float()  # (B, C, h, w)
    mean, std = _stats(vae, z)
    return F.pixel_unshuffle((z - mean) / std, vae.space_to_depth)  # (B, C s^2, h/s, w/s)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """normalised latents (B, C, h, w) -> images (B, 3, f h, f w) in [-1, 1], f the VAE factor."""
    latents = F.pixel_shuffle(latents, vae.space_to_depth)  # (B, C / s^2, h s, w s)
    mean, std = _stats(vae, latents)
    z = latents * std + mean
    return vae.decode(z[:, :, None].to(vae.dtype)).sample[:, :, 0].float().clamp(-1, 1)


def decode_for_training(vae, z: torch.Tensor) -> torch.Tensor:
    """Decode one-frame latents (B, C, 1, h, w) without the [-1, 1] clamp AutoencoderKLQwenImage.decode applies.

    The clamp has zero gradient wherever the output overshoots, which freezes colour channels of a VAE trained
    from scratch (seen here: every object decoded in one muddy colour); training on the unclamped output fixes it.
    Same modules and order as diffusers' _decode for a single frame.
    """
    vae.clear_cache()
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0])
    vae.clear_cache()
    return out
