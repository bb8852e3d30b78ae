"""Samplers: plain functions with one signature, `sampler(velocity_fn, x, sigmas, progress=False) -> x0`.

`velocity_fn(x, sigma) -> v` hides the network and guidance. Sigma schedules come from diffusers'
FlowMatchEulerDiscreteScheduler with Qwen-Image's shift settings, so sampling matches QwenImagePipeline.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from kiln.flow import calculate_shift, predict_velocity


def make_scheduler(sched) -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's scheduler from a SchedulerConfig (also written into diffusers exports)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=sched.base_shift,
        max_shift=sched.max_shift,
        base_image_seq_len=sched.base_image_seq_len,
        max_image_seq_len=sched.max_image_seq_len,
        shift_terminal=sched.shift_terminal,
        time_shift_type="exponential",
    )


def flow_sigmas(steps: int, image_seq_len: int, sched) -> torch.Tensor:
    """(steps + 1,) sigmas from 1 down to 0, the schedule QwenImagePipeline uses for this many image tokens."""
    scheduler = make_scheduler(sched)
    base = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=base, mu=calculate_shift(image_seq_len, sched))
    return scheduler.sigmas.float()


def sample_euler(velocity_fn, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Euler ODE integration of dx/dsigma = v from sigmas[0] (noise) to sigmas[-1] (data). x: (B, N, D)."""
    x = x.float()
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress, leave=False):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, sigma).float()
        x = x + (sigma_next - sigma) * v
    return x


def guided_velocity(model, text, mask, null_text=None, null_mask=None, cfg: float = 1.0, grid=(1, 1)):
    """velocity_fn for sample_euler with Qwen-Image's true CFG: the negative prompt gives the unconditional
    branch, and the guided velocity is rescaled per token to the conditional one's norm.
    text: (B, L, D), null_text: (B, L0, D); both branches run as one batch of 2B."""
    if cfg <= 1.0 or null_text is None:
        return lambda x, sigma: predict_velocity(model, x, sigma.expand(x.shape[0]), text, mask, grid)
    length = max(text.shape[1], null_text.shape[1])
    pad = lambda e, m: (  # noqa: E731 - right-pad embeddings and mask to a common length
        torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])),
        torch.nn.functional.pad(m, (0, length - m.shape[1])),
    )
    (text, mask), (null_text, null_mask) = pad(text, mask), pad(null_text, null_mask)
    both_text, both_mask = torch.cat([text, null_text]), torch.cat([mask, null_mask])  # (2B, L, D), (2B, L)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x2 = torch.cat([x, x])  # (2B, N, D)
        cond, uncond = predict_velocity(model, x2, sigma.expand(x2.shape[0]), both_text, both_mask, grid).chunk(2)
        guided = uncond + cfg * (cond - uncond)
        return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    return velocity


SAMPLERS = {"euler": sample_euler}
