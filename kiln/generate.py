"""Text -> image with a trained backbone: noise drawn exactly as QwenImagePipeline draws it, a sampler + CFG, decode."""

from __future__ import annotations

import torch
from PIL import Image

from kiln.diffusion import Denoiser, make_process
from kiln.geometry import TOKEN_PATCH, token_grid
from kiln.models import pack, unpack
from kiln.sampler import SAMPLERS, guided_prediction, sampling_times
from kiln.vae import decode_latents


def initial_noise(batch: int, channels: int, h: int, w: int, generator=None, device="cpu") -> torch.Tensor:
    """(B, h/2*w/2, C*4) packed noise; drawn as (B, 1, C, h, w) like QwenImagePipeline.prepare_latents."""
    noise = torch.randn((batch, 1, channels, h, w), generator=generator, device=device)
    return pack(noise[:, 0])


@torch.no_grad()
def generate_latents(
    model, text, mask, null_text, null_mask, *, height, width, vae_factor, steps, cfg, sched, generator=None,
    progress=False, objective=None, sampler: str = "euler", cfg_renorm: bool = True,
) -> torch.Tensor:
    """text: (B, L, D), mask: (B, L); null_*: the negative prompt, (1, L0, D) or (B, L0, D). vae_factor: the VAE's
    pixels per latent (kiln.geometry.vae_factor). objective: the ObjectiveConfig the model trained with (None: flow);
    sampler: a name in kiln.sampler.SAMPLERS. Returns normalised latents (B, C, height/vae_factor, width/vae_factor)."""
    b = text.shape[0]
    multiple = vae_factor * TOKEN_PATCH
    if height % multiple or width % multiple:
        raise ValueError(f"width and height must be multiples of {multiple}, got {width}x{height}")
    h, w = height // vae_factor, width // vae_factor
    channels = model.config.out_channels or model.config.in_channels
    x = initial_noise(b, channels, h, w, generator, text.device)  # (B, N, C*4)
    if null_text is not None and null_text.shape[0] == 1:
        null_text, null_mask = null_text.expand(b, -1, -1), null_mask.expand(b, -1)
    guided = guided_prediction(model, text, mask, null_text, null_mask, cfg, grid=token_grid(h, w), renorm=cfg_renorm)
    denoiser = Denoiser(guided, "flow" if objective is None else objective.kind, make_process(objective))
    times = sampling_times(steps, x.shape[1], objective, sched).to(x.device)
    x = SAMPLERS[sampler](denoiser, x, times, progress=progress, generator=generator)
    return unpack(x, h, w)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 pixels (B, 3, H, W)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1], or uint8 pixels from to_uint8 -> PIL images."""
    pixels = images if images.dtype == torch.uint8 else to_uint8(images)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]


@torch.no_grad()
def generate_images(model, vae, text, mask, null_text, null_mask, **kwargs) -> list[Image.Image]:
    latents = generate_latents(model, text, mask, null_text, null_mask, **kwargs)
    return to_pil(decode_latents(vae, latents))


def image_grid(images: list[Image.Image], labels: list[str] | None = None, cols: int = 8) -> Image.Image:
    """A labelled contact sheet for MLflow and eyeballing."""
    from PIL import ImageDraw

    w, h = images[0].size
    label_h = 12 if labels else 0
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + label_h)
        sheet.paste(img.resize((w, h)), (x, y + label_h))
        if labels:
            draw.text((x + 1, y), labels[i][: max(4, w // 6)], fill=(0, 0, 0))
    return sheet

