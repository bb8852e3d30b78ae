"""Samplers: plain functions with one signature, `sampler(denoiser, x, times, progress=False, generator=None) -> x0`.

`denoiser` (kiln.diffusion.Denoiser) hides the network, its parameterisation and guidance: `denoiser(x, t)` gives
(x0, noise) estimates, `denoiser.velocity(x, t)` the flow's dx/dt. `times` runs from 1 (noise) down to 0 (data):
for flow objectives the sigmas of diffusers' FlowMatchEulerDiscreteScheduler with Qwen-Image's shift settings (so
sampling matches QwenImagePipeline), for VP objectives evenly spaced training steps. Samplers: Euler on the flow ODE,
DDIM (deterministic), DDPM ancestral, and Flow-GRPO's SDE sampler (which also returns the per-step log-probabilities
and the trajectory that GRPO needs).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from kiln.diffusion import make_process
from kiln.flow import calculate_shift
from kiln.models import predict


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


def sampling_times(steps: int, image_seq_len: int, objective, sched) -> torch.Tensor:
    """(steps + 1,) times from 1 (noise) to 0 (data) for this objective. VP: evenly spaced over its training steps
    (DDIM's 'trailing' spacing: the first is the last training step), then 0 (clean)."""
    if objective is None or objective.kind == "flow":
        return flow_sigmas(steps, image_seq_len, sched)
    process = make_process(objective)
    if steps > process.steps:
        raise ValueError(f"sampling steps {steps} > the objective's {process.steps} training steps")
    times = process.grid(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).float()
    times[-1] = 0.0
    return times


def sample_euler(denoiser, x: torch.Tensor, times: torch.Tensor, progress: bool = False, generator=None):
    """Euler integration of the flow ODE dx/dt = v from times[0] (noise) to times[-1] (data). x: (B, N, D)."""
    x = x.float()
    for i in tqdm(range(len(times) - 1), desc="sampling", disable=not progress, leave=False):
        t, t_next = times[i], times[i + 1]
        x = x + (t_next - t) * denoiser.velocity(x, t)
    return x


def sample_ddim(denoiser, x: torch.Tensor, times: torch.Tensor, progress: bool = False, generator=None,
                eta: float = 0.0):
    """DDIM (Song et al. 2021) on any process x_t = alpha x0 + sigma noise: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2)
    noise + c z, with c^2 = eta^2 (sigma_s / sigma_t)^2 (sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2), the variance
    of q(x_s | x_t, x0) scaled by eta^2. eta = 0: deterministic (on the flow process, exactly the Euler step);
    eta = 1: DDPM's ancestral sampling."""
    x = x.float()
    process = denoiser.process
    for i in tqdm(range(len(times) - 1), desc="sampling", disable=not progress, leave=False):
        t, s = times[i], times[i + 1]
        x0, noise = denoiser(x, t)
        (alpha_t, sigma_t), (alpha_s, sigma_s) = process.alpha_sigma(t), process.alpha_sigma(s)
        if eta > 0 and sigma_s > 0:
            c2 = eta**2 * (sigma_s / sigma_t) ** 2 * (sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2)
            c2 = c2.clamp(min=0.0)
            z = torch.randn(x.shape, generator=generator, device=x.device)
            x = alpha_s * x0 + (sigma_s**2 - c2).sqrt() * noise + c2.sqrt() * z
        else:
            x = alpha_s * x0 + sigma_s * noise
    return x


def sample_ddpm(denoiser, x: torch.Tensor, times: torch.Tensor, progress: bool = False, generator=None):
    """DDPM's ancestral sampler (Ho et al. 2020): a draw from the posterior q(x_s | x_t, x0) every step."""
    return sample_ddim(denoiser, x, times, progress, generator, eta=1.0)


def guided_prediction(model, text, mask, null_text=None, null_mask=None, cfg: float = 1.0, grid=(1, 1),
                      renorm: bool = True):
    """fn(x, t) -> the network's output with classifier-free guidance: the negative prompt gives the unconditional
    branch, guided = uncond + cfg (cond - uncond). renorm: Qwen-Image's true CFG, which rescales the guided output
    per token to the conditional one's norm. text: (B, L, D), null_text: (B, L0, D); both branches run as one
    batch of 2B."""
    if cfg <= 1.0 or null_text is None:
        return lambda x, t: predict(model, x, t.expand(x.shape[0]), text, mask, grid)
    length = max(text.shape[1], null_text.shape[1])
    pad = lambda e, m: (  # noqa: E731 - right-pad embeddings and mask to a common length
        torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])),
        torch.nn.functional.pad(m, (0, length - m.shape[1])),
    )
    (text, mask), (null_text, null_mask) = pad(text, mask), pad(null_text, null_mask)
    both_text, both_mask = torch.cat([text, null_text]), torch.cat([mask, null_mask])  # (2B, L, D), (2B, L)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x2 = torch.cat([x, x])  # (2B, N, D)
        cond, uncond = predict(model, x2, t.expand(x2.shape[0]), both_text, both_mask, grid).chunk(2)
        out = uncond + cfg * (cond - uncond)
        return out * (cond.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True)) if renorm else out

    return guided


SAMPLERS = {"euler": sample_euler, "ddim": sample_ddim, "ddpm": sample_ddpm}


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


def sample_sde(denoiser, x: torch.Tensor, times: torch.Tensor, progress: bool = False, generator=None, *,
               noise_level: float, window: tuple[int, int] | None = None):
    """Flow-GRPO SDE sampling from times[0] (noise) to times[-1] (data); the samplers' signature.

    window = (start, stop): SDE steps only for step indices start <= i < stop and Euler (ODE) steps elsewhere, as in
    Flow-GRPO-Fast and MixGRPO: the reward's spread then comes from the window's noise alone, so the policy gradient
    credits the steps it trains on. None: every step is an SDE step (Flow-GRPO).

    x: (B, ...). Returns (x0 (B, ...), log_probs (B, n), trajectory (B, n + 1, ...)) with n = stop - start:
    trajectory[:, k] is the sample before step start + k and trajectory[:, k + 1] the one it drew, the pair whose
    log-prob GRPO re-evaluates. noise_level = 0 reproduces sample_euler (with NaN log-probs)."""
    steps = len(times) - 1
    start, stop = (0, steps) if window is None else window
    if not 0 <= start < stop <= steps:
        raise ValueError(f"SDE window {window} must lie within the {steps} sampling steps")
    x = x.float()
    sigma_max = times[1] if len(times) > 1 else None
    trajectory, log_probs = [], []
    for i in tqdm(range(steps), desc="sampling (SDE)", disable=not progress, leave=False):
        v = denoiser.velocity(x, times[i])
        if not start <= i < stop:
            x = x + (times[i + 1] - times[i]) * v
            continue
        trajectory.append(x)
        x, log_prob, _, _ = sde_step(v, x, times[i], times[i + 1], noise_level=noise_level, sigma_max=sigma_max,
                                     generator=generator)
        log_probs.append(log_prob)
        if i == stop - 1:
            trajectory.append(x)
    return x, torch.stack(log_probs, dim=1), torch.stack(trajectory, dim=1)
