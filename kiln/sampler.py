"""Samplers: plain functions with one signature, `sampler(velocity_fn, x, sigmas, progress=False) -> x0`.

`velocity_fn(x, sigma) -> v` hides the network and guidance. Sigma schedules come from diffusers'
FlowMatchEulerDiscreteScheduler with Qwen-Image's shift settings, so sampling matches QwenImagePipeline.
`sample_sde` (Flow-GRPO's exploration sampler) takes the same leading arguments and also returns the per-step
log-probabilities and the trajectory that GRPO needs.
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


# --------------------------------------------------------------------------- SDE sampling for Flow-GRPO
# Flow-GRPO (Liu et al. 2025, yifan123/flow_grpo `sde_step_with_logprob`) turns the Euler ODE into an SDE with the
# same marginals, so each step is a Gaussian policy with a closed-form log-probability:
#   x' = x + [v + s_t^2 / (2 t) * (x + (1 - t) v)] dt + s_t sqrt(|dt|) eps,   s_t = a * sqrt(t / (1 - t)),
# with t = sigma, dt = sigma_next - sigma < 0 and a = noise_level.

_HALF_LOG_2PI = 0.5 * float(np.log(2 * np.pi))


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A float, 0-d or (B,) tensor as a tensor that broadcasts against `like` (B, ...)."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.view(-1, *([1] * (like.ndim - 1))) if value.ndim == 1 else value


def sde_mean_std(v, x, sigma, sigma_next, *, noise_level: float, sigma_max=None):
    """Mean and standard deviation of the Gaussian SDE step from sigma to sigma_next.

    v, x: (B, ...) velocity and current sample; sigma, sigma_next: floats, 0-d or (B,) tensors.
    `sigma_max` stands in for sigma in 1 - sigma where sigma == 1, so the first step's noise stays finite; Flow-GRPO
    uses the schedule's second sigma (sigmas[1]). Returns mean (B, ...) and the step's std s_t * sqrt(|dt|),
    broadcastable to (B, ...). With noise_level = 0 the mean is exactly the Euler step and the std is 0."""
    v, x = v.float(), x.float()  # Flow-GRPO computes in fp32: bf16 overflows in the mean
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    if sigma_max is None and bool((sigma == 1).any()):
        raise ValueError("sigma == 1 needs sigma_max (Flow-GRPO uses sigmas[1]) to keep the noise scale finite")
    capped = sigma if sigma_max is None else torch.where(sigma == 1, _per_sample(sigma_max, x), sigma)
    s_t = noise_level * torch.sqrt(sigma / (1 - capped))
    dt = sigma_next - sigma
    # The drift adds the score correction s_t^2/(2t) (x + (1-t) v) to v so the marginals stay the ODE's.
    mean = x + (v + s_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, s_t * torch.sqrt(-dt)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """(B,) log N(sample; mean, std^2), averaged (not summed) over the non-batch dims as Flow-GRPO does, so its scale
    does not grow with image size. The sample is detached: gradients reach the policy only through the mean."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    z = (sample.detach().float() - mean) / std
    log_prob = -0.5 * z**2 - torch.log(std) - _HALF_LOG_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def sde_step(v, x, sigma, sigma_next, *, noise_level: float, sigma_max=None, generator=None):
    """One Flow-GRPO SDE step. v, x: (B, ...). Returns (x_next (B, ...), log_prob (B,), mean (B, ...), std).

    log_prob is the Gaussian log-density of x_next, averaged over the non-batch dims (see gaussian_log_prob);
    it is NaN when noise_level = 0, where the step is the deterministic Euler step."""
    mean, std = sde_mean_std(v, x, sigma, sigma_next, noise_level=noise_level, sigma_max=sigma_max)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    x_next = mean + std * noise
    return x_next, gaussian_log_prob(x_next, mean, std), mean, std


def sde_step_log_prob(v, x, x_next, sigma, sigma_next, *, noise_level: float, sigma_max=None):
    """log-prob (B,) of a GIVEN next sample x_next under the velocity v (the current model's, for the PPO ratio on a
    stored trajectory), plus the step's mean (B, ...) and std (for the KL to the reference model)."""
    mean, std = sde_mean_std(v, x, sigma, sigma_next, noise_level=noise_level, sigma_max=sigma_max)
    return gaussian_log_prob(x_next, mean, std), mean, std


def sample_sde(velocity_fn, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = False, *, noise_level: float,
               generator=None):
    """Flow-GRPO SDE sampling from sigmas[0] (noise) to sigmas[-1] (data); sample_euler's leading signature.

    x: (B, ...). Returns (x0 (B, ...), log_probs (B, steps), trajectory (B, steps + 1, ...)): trajectory[:, j] is
    the sample before step j and trajectory[:, j + 1] the one it drew, the pair whose log-prob GRPO re-evaluates.
    noise_level = 0 reproduces sample_euler (with NaN log-probs)."""
    x = x.float()
    sigma_max = sigmas[1] if len(sigmas) > 1 else None
    trajectory, log_probs = [x], []
    for i in tqdm(range(len(sigmas) - 1), desc="sampling (SDE)", disable=not progress, leave=False):
        v = velocity_fn(x, sigmas[i]).float()
        x, log_prob, _, _ = sde_step(v, x, sigmas[i], sigmas[i + 1], noise_level=noise_level, sigma_max=sigma_max,
                                     generator=generator)
        trajectory.append(x)
        log_probs.append(log_prob)
    return x, torch.stack(log_probs, dim=1), torch.stack(trajectory, dim=1)
