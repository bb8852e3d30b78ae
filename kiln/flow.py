"""Rectified flow's own pieces (the objective Qwen-Image trains with; kiln/diffusion.py holds all objectives).

x_t = (1 - t) * x0 + t * noise, target velocity v = noise - x0, t ~ logit-normal then shifted toward noise by the
same resolution-dependent exponential shift Qwen-Image's scheduler applies at sampling time.
"""

from __future__ import annotations

import math

import torch

from kiln.models import predict


def calculate_shift(image_seq_len: int, sched) -> float:
    """mu grows linearly with the number of image tokens (diffusers' calculate_shift with Qwen-Image's values)."""
    slope = (sched.max_shift - sched.base_shift) / (sched.max_image_seq_len - sched.base_image_seq_len)
    return sched.base_shift + slope * (image_seq_len - sched.base_image_seq_len)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """Exponential time shift: t' = e^mu / (e^mu + 1/t - 1); mu > 0 moves t toward noise."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sample_timesteps(batch: int, image_seq_len: int, objective, sched, generator=None, device="cpu") -> torch.Tensor:
    """(B,) training timesteps: logit-normal, then the resolution-dependent shift."""
    normal = torch.randn(batch, generator=generator, device=device) * objective.logit_std + objective.logit_mean
    t = torch.sigmoid(normal).clamp(1e-5, 1 - 1e-5)
    return time_shift(calculate_shift(image_seq_len, sched), t)


def drop_captions(text, mask, null_text, null_mask, p: float, generator=None, rows: slice | None = None,
                  global_batch: int | None = None):
    """Replace a fraction p of captions with the empty caption's embedding (for classifier-free guidance).
    rows / global_batch: see kiln.diffusion.diffusion_loss."""
    if p <= 0:
        return text, mask
    b, length, _ = text.shape
    rows, total = (rows, global_batch) if rows is not None else (slice(0, b), b)
    drop = (torch.rand(total, generator=generator, device=text.device) < p)[rows]  # (B,)
    if not drop.any():
        return text, mask
    null_len = null_text.shape[0]
    if null_len > length:  # pad the batch so the empty caption fits
        text = torch.nn.functional.pad(text, (0, 0, 0, null_len - length))
        mask = torch.nn.functional.pad(mask, (0, null_len - length))
        length = null_len
    null_full = torch.zeros(length, text.shape[-1], device=text.device, dtype=text.dtype)
    null_full[:null_len] = null_text
    null_mask_full = torch.zeros(length, dtype=torch.bool, device=text.device)
    null_mask_full[:null_len] = null_mask
    text = torch.where(drop[:, None, None], null_full, text)
    mask = torch.where(drop[:, None], null_mask_full, mask)
    return text, mask


def drop_tokens(mask, p: float, generator=None, rows: slice | None = None, global_batch: int | None = None,
                width: int | None = None):
    """Hide each caption token from attention with probability p (mask (B, L) bool -> a new mask), keeping at least
    one token per caption. A model that sometimes sees "yellow" without "circle" and "circle" without "yellow" has to
    let each word act on its own, which is what a colour-shape pair it never saw together needs.
    rows / global_batch: see kiln.diffusion.diffusion_loss (the draws are the global batch's); width: the longest
    caption any process can hold (text_encoder.max_length), so every process draws the same numbers."""
    if p <= 0:
        return mask
    b, length = mask.shape
    rows, total = (rows, global_batch) if rows is not None else (slice(0, b), b)
    draws = torch.rand(total, max(width or length, length), generator=generator, device=mask.device)
    keep = (draws[rows, :length] >= p)  # (B, L)
    kept = mask & keep
    empty = ~kept.any(dim=1)  # every token drawn out: keep the caption whole
    return torch.where(empty[:, None], mask, kept)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise; x0, noise: (B, N, C*4) packed tokens, t: (B,)."""
    return (1 - t[:, None, None]) * x0 + t[:, None, None] * noise


def velocity_errors(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text, mask, grid) -> torch.Tensor:
    """(B,) per-sample MSE between the predicted velocity at x_t and the target noise - x0, for a given t and noise.
    x0, noise: (B, N, C*4) packed tokens; t: (B,). The objective's core, shared with Diffusion-DPO."""
    pred = predict(model, interpolate(x0, noise, t), t, text, mask, grid)
    return (pred.float() - (noise - x0).float()).pow(2).mean(dim=(1, 2))


def loss_by_bucket(per_sample: torch.Tensor, t: torch.Tensor, buckets: int) -> dict[int, tuple[float, int]]:
    """Sum and count of the loss per timestep bucket [i/buckets, (i+1)/buckets): a cheap, telling diagnostic."""
    index = (t * buckets).long().clamp(max=buckets - 1)
    out = {}
    for i in range(buckets):
        sel = index == i
        if sel.any():
            out[i] = (per_sample[sel].sum().item(), int(sel.sum()))
    return out
