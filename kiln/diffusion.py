"""Diffusion objectives on one forward process x_t = alpha(t) x0 + sigma(t) noise, t in [0, 1] (0: data, 1: noise).

- flow (rectified flow, Qwen-Image): alpha = 1 - t, sigma = t; the network predicts the velocity noise - x0.
- epsilon (DDPM, SD1), v (Salimans & Ho 2022, SD2) and x0 on DDPM's variance-preserving process: alpha^2 =
  alpha_bar, sigma^2 = 1 - alpha_bar, with alpha_bar from diffusers' DDPMScheduler for the configured beta schedule;
  step i of T is t = i / T, and t = 0 is clean data (alpha_bar = 1, DDIM's final step).
Every parameterisation converts to the same pair (x0, noise) estimates (`Denoiser`), so every sampler in
kiln/sampler.py runs every objective (k-diffusion's split: parameterisations wrap the network).
"""

from __future__ import annotations

import functools

import torch

from kiln.flow import sample_timesteps
from kiln.geometry import token_grid
from kiln.models import pack, predict

VP_KINDS = ("epsilon", "v", "x0")


class Process:
    """alpha(t), sigma(t) of the forward process an objective trains on."""

    def __init__(self, kind: str, alphas_cumprod: torch.Tensor | None = None):
        self.kind = kind  # "flow" or "vp"
        if kind == "vp":  # alpha_bar at t = i / T for i = 0..T (i = 0: clean)
            self.alpha_bar = torch.cat([torch.ones(1), alphas_cumprod.double()])
            self.steps = len(alphas_cumprod)
            self._on_device: dict[torch.device, torch.Tensor] = {}  # the table per device, copied once

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: any shape -> alpha, sigma of the same shape (float32)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        if self.kind == "flow":
            return 1 - t, t
        index = (t.double() * self.steps).round().long().clamp(0, self.steps)
        table = self._on_device.get(t.device)
        if table is None:
            table = self._on_device[t.device] = self.alpha_bar.to(t.device)
        alpha_bar = table[index]
        return alpha_bar.sqrt().float(), (1 - alpha_bar).sqrt().float()

    def grid(self, t: torch.Tensor) -> torch.Tensor:
        """t snapped to the times the network was trained at (VP: multiples of 1/T)."""
        if self.kind == "flow":
            return t
        return (t * self.steps).round() / self.steps


@functools.lru_cache(maxsize=8)
def _vp_process(beta_schedule: str, steps: int) -> Process:
    from diffusers import DDPMScheduler

    return Process("vp", DDPMScheduler(num_train_timesteps=steps, beta_schedule=beta_schedule).alphas_cumprod.clone())


def make_process(objective) -> Process:
    """The forward process of an ObjectiveConfig (None: rectified flow); built once per schedule, since the training
    step and every sampling step ask for it."""
    if objective is None or objective.kind == "flow":
        return Process("flow")
    return _vp_process(objective.beta_schedule, objective.train_timesteps)


def _per_row(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or 0-d -> broadcastable against (B, ...)."""
    value = value.to(like.device, like.dtype)
    return value.view(-1, *([1] * (like.ndim - 1))) if value.ndim == 1 else value


def target(kind: str, x0: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """What the network learns to output at x_t = alpha x0 + sigma noise."""
    if kind == "flow":
        return noise - x0
    if kind == "epsilon":
        return noise
    if kind == "v":
        return alpha * noise - sigma * x0
    return x0


def to_x0_noise(kind: str, out: torch.Tensor, x: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output at x (time with these alpha, sigma) -> (x0, noise) estimates."""
    if kind == "flow":  # x = (1 - t) x0 + t noise, out = noise - x0
        return x - sigma * out, x + alpha * out
    if kind == "epsilon":
        return (x - sigma * out) / alpha, out
    if kind == "v":  # alpha^2 + sigma^2 = 1
        return alpha * x - sigma * out, sigma * x + alpha * out
    return out, (x - alpha * out) / sigma


def training_times(total: int, seq_len: int, objective, sched, process: Process, generator=None,
                   device="cpu") -> torch.Tensor:
    """(total,) training times. flow: logit-normal then Qwen-Image's resolution shift; VP: a uniform step 1..T."""
    if process.kind == "flow":
        return sample_timesteps(total, seq_len, objective, sched, generator, device)
    steps = torch.randint(1, process.steps + 1, (total,), generator=generator, device=device)
    return steps.float() / process.steps


def diffusion_loss(model, latents, text, mask, objective, sched, generator=None, rows: slice | None = None,
                   global_batch: int | None = None):
    """latents: (B, C, h, w) normalised x0. Returns (mean loss, per-sample loss (B,), t (B,)): the unweighted MSE
    between the network's output at x_t and the objective's target.
    Data parallel: this process holds `rows` of a global batch of `global_batch` samples; t and noise are drawn for
    the whole global batch and sliced, so N processes draw exactly what one process would."""
    b, _, h, w = latents.shape
    x0 = pack(latents)  # (B, N, C*4)
    process = make_process(objective)
    rows, total = (rows, global_batch) if rows is not None else (slice(0, b), b)
    t = training_times(total, x0.shape[1], objective, sched, process, generator, latents.device)[rows]  # (B,)
    noise = torch.randn((total, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[rows]
    per_sample = objective_errors(model, x0, noise, t, text, mask, objective.kind, process, token_grid(h, w))
    return per_sample.mean(), per_sample, t


def objective_errors(model, x0, noise, t, text, mask, kind: str, process, grid) -> torch.Tensor:
    """(B,) MSE between the network's output at x_t = alpha(t) x0 + sigma(t) noise and the objective's target.
    x0, noise: (B, N, D) packed tokens; t: (B,) times on the process's grid."""
    alpha, sigma = (_per_row(v, x0) for v in process.alpha_sigma(t))  # (B, 1, 1)
    out = predict(model, alpha * x0 + sigma * noise, t, text, mask, grid)
    return (out.float() - target(kind, x0, noise, alpha, sigma).float()).pow(2).mean(dim=(1, 2))


@torch.no_grad()
def fixed_time_loss(model, latents, text, mask, objective, times: list[float], generator) -> torch.Tensor:
    """(B,) per-sample loss averaged over the given times, with noise from `generator`: the same latents, times and
    generator seed give the same noise, so two models' held-out losses compare sample for sample."""
    b, _, h, w = latents.shape
    x0 = pack(latents)  # (B, N, C*4)
    process = make_process(objective)
    total = torch.zeros(b, device=latents.device)
    for time in times:
        t = process.grid(torch.full((b,), float(time), device=latents.device))  # (B,): a time the network trained at
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        total += objective_errors(model, x0, noise, t, text, mask, objective.kind, process, token_grid(h, w))
    return total / len(times)


class Denoiser:
    """The (guided) network under one parameterisation: what samplers call.

    `fn(x, t) -> output` is the network with guidance (x: (B, N, D), t: 0-d); `denoiser(x, t) -> (x0, noise)`;
    `velocity(x, t)` is the flow's dx/dt, exactly the network's output for the flow objective."""

    def __init__(self, fn, kind: str, process: Process):
        self.fn, self.kind, self.process = fn, kind, process

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.process.alpha_sigma(t)
        return to_x0_noise(self.kind, self.fn(x, t).float(), x, alpha.to(x.device), sigma.to(x.device))

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.kind != "flow":
            raise ValueError(f"the Euler and SDE samplers integrate the flow ODE; objective {self.kind!r} needs "
                             f"ddim or ddpm")
        return self.fn(x, t).float()
