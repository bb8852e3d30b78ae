"""Objectives, samplers and backbones of the compare-systems presets: exact on planted cases, and the same numbers
as diffusers' own DDIM and DDPM schedulers."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from kiln.config import ModelConfig, ObjectiveConfig, load_config
from kiln.diffusion import Denoiser, diffusion_loss, make_process, target, to_x0_noise
from kiln.models import build_backbone, pack, predict, unpack
from kiln.sampler import SAMPLERS, sample_ddim, sample_euler, sampling_times

KINDS = ("flow", "epsilon", "v", "x0")
SYSTEMS = ("ddpm", "sd1", "sd2", "dit", "sd3", "qwen-image-tiny")


def _objective(kind, schedule="linear"):
    return ObjectiveConfig(kind=kind, beta_schedule=schedule)


@pytest.mark.parametrize("kind", KINDS)
def test_each_parameterisation_recovers_x0_and_noise_from_its_target(kind):
    process = make_process(_objective(kind))
    x0, noise = torch.randn(5, 4, 3), torch.randn(5, 4, 3)
    t = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.999])
    alpha, sigma = (v.view(-1, 1, 1) for v in process.alpha_sigma(t))
    x_t = alpha * x0 + sigma * noise
    got_x0, got_noise = to_x0_noise(kind, target(kind, x0, noise, alpha, sigma), x_t, alpha, sigma)
    assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_noise, noise, atol=1e-4)


def test_vp_process_is_diffusers_ddpm_schedule():
    process = make_process(_objective("epsilon", "scaled_linear"))
    ab = DDPMScheduler(beta_schedule="scaled_linear").alphas_cumprod
    alpha, sigma = process.alpha_sigma(torch.tensor([0.0, 0.001, 0.5, 1.0]))
    assert torch.allclose(alpha**2, torch.stack([torch.tensor(1.0), ab[0], ab[499], ab[999]]), atol=1e-6)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(4), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_land_on_x0_with_a_perfect_network(kind, sampler):
    """A network that always knows the answer (x0 fixed) brings every sampler to x0 in any number of steps."""
    objective = _objective(kind)
    process = make_process(objective)
    x0 = torch.randn(3, 4, 8)

    def perfect(x, t):  # the output that reproduces x0 at (x, t)
        alpha, sigma = process.alpha_sigma(t)
        noise = (x - alpha * x0) / sigma
        return target(kind, x0, noise, alpha, sigma)

    for steps in (2, 5, 25):
        times = sampling_times(steps, 4, objective, load_config("tiny").scheduler)
        out = SAMPLERS[sampler](Denoiser(perfect, kind, process), torch.randn(3, 4, 8), times,
                                generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, x0, atol=1e-3), (kind, sampler, steps, (out - x0).abs().max())


def test_ddim_on_the_flow_process_is_the_euler_step():
    process, times = make_process(None), torch.linspace(1, 0, 8)
    net = lambda x, t: torch.sin(3 * x) * (1 + t)  # noqa: E731 - any velocity field
    x = torch.randn(2, 4, 8)
    euler = sample_euler(Denoiser(net, "flow", process), x, times)
    ddim = sample_ddim(Denoiser(net, "flow", process), x, times)
    assert torch.allclose(euler, ddim, atol=1e-5)


def _eps_net(process):
    """An epsilon network that depends on x and on alpha_bar (not on the timestep's numbering)."""
    def net(x, t):
        alpha, _ = process.alpha_sigma(t)
        return torch.tanh(x) * (0.5 + alpha)
    return net


def test_ddim_matches_diffusers_ddim_scheduler():
    objective = _objective("epsilon", "scaled_linear")
    process = make_process(objective)
    net, steps, x = _eps_net(process), 10, torch.randn(2, 4, 8)
    ours = sample_ddim(Denoiser(net, "epsilon", process), x, sampling_times(steps, 4, objective, None))

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
                              timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    theirs = x.clone()
    for step in scheduler.timesteps:  # diffusers' step k is our time (k + 1) / 1000
        theirs = scheduler.step(net(theirs, (step + 1) / 1000), step, theirs, eta=0.0).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_ddpm_matches_diffusers_ddpm_scheduler_draw_for_draw():
    objective = _objective("epsilon", "linear")
    process = make_process(objective)
    net, steps, x = _eps_net(process), 20, torch.randn(2, 4, 8)
    ours = SAMPLERS["ddpm"](Denoiser(net, "epsilon", process), x, sampling_times(steps, 4, objective, None),
                            generator=torch.Generator().manual_seed(3))

    scheduler = DDPMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    theirs, generator = x.clone(), torch.Generator().manual_seed(3)
    for step in scheduler.timesteps:
        theirs = scheduler.step(net(theirs, (step + 1) / 1000), step, theirs, generator=generator).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("kind", ["qwen-image", "sd3", "dit", "unet"])
def test_every_backbone_predicts_packed_tokens_and_ignores_padding(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, num_layers=2, block_out_channels=[16, 32], num_attention_heads=2,
                      attention_head_dim=32, axes_dims_rope=[8, 12, 12])
    model = build_backbone(cfg, latent_channels=4, text_dim=24).eval()
    x = torch.randn(2, 4 * 3, 16)  # a 8 x 6 latent: (h/2 * w/2, C * 4) tokens
    text, mask = torch.randn(2, 7, 24), torch.ones(2, 7, dtype=torch.bool)
    mask[:, 5:] = False
    with torch.no_grad():
        out = predict(model, x, torch.tensor([0.2, 0.9]), text, mask, (4, 3))
        other_padding = text.clone()
        other_padding[:, 5:] = torch.randn(2, 2, 24)
        again = predict(model, x, torch.tensor([0.2, 0.9]), other_padding, mask, (4, 3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(out, again, atol=1e-5)  # what lies under the mask does not matter



def test_unet_without_output_norm_passes_channel_offsets_through():
    """An epsilon U-Net must copy each channel's spatial mean from its input at high noise; diffusers' output
    GroupNorm (one channel per group here) pins that mean, the option that drops it lets the skip path carry it."""
    x, offset = torch.randn(4, 8, 8, 8), torch.randn(4, 8, 1, 1)  # (B, C, h, w) latents, per-channel shifts
    text, mask = torch.randn(4, 5, 24), torch.ones(4, 5, dtype=torch.bool)
    change = {}
    for output_norm in (True, False):
        torch.manual_seed(0)
        cfg = ModelConfig(kind="unet", block_out_channels=[32, 64], num_attention_heads=2,
                          unet_output_norm=output_norm)
        model = build_backbone(cfg, latent_channels=8, text_dim=24).eval()
        with torch.no_grad():
            outs = [unpack(predict(model, pack(z), torch.full((4,), 0.5), text, mask, (4, 4)), 8, 8)
                    for z in (x, x + offset)]
        change[output_norm] = (outs[1] - outs[0]).mean(dim=(2, 3)).std().item()  # output channel-mean shift
    assert model.conv_norm_out is None
    assert change[False] > 4 * change[True], change

@pytest.mark.parametrize("system", SYSTEMS)
def test_every_system_preset_learns_a_fixed_batch(system):
    """Each comparison preset's backbone and objective, 60 steps on one tiny batch: the loss falls well below its
    start (a wrong target or a broken backbone call would not fit)."""
    cfg = load_config(system)
    torch.manual_seed(0)
    model = build_backbone(cfg.model.model_copy(update={"num_layers": 2}), latent_channels=4, text_dim=16)
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 3, 16)
    mask = torch.ones(4, 3, dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        loss, _, _ = diffusion_loss(model, latents, text, mask, cfg.objective, cfg.scheduler,
                                    torch.Generator().manual_seed(step % 2))  # two fixed (t, noise) draws
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, (system, losses[:4], losses[-4:])


class _ToyDenoiser(torch.nn.Module):
    """An MLP on packed tokens with Qwen-Image's call signature (predict() passes it the packed tokens)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(17, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128),
                                       torch.nn.SiLU(), torch.nn.Linear(128, 16))

    def forward(self, hidden_states, timestep, **kwargs):
        t = timestep.view(-1, 1, 1).expand(*hidden_states.shape[:2], 1)
        return (self.net(torch.cat([hidden_states, t], -1)),)


@pytest.mark.parametrize("kind,schedule,train_steps", [
    ("flow", "linear", 1000), ("v", "scaled_linear", 1000), ("x0", "linear", 1000),
    # An epsilon network's error is divided by alpha in its x0 estimate (0.0064 at the first step on DDPM's linear
    # betas, 0.068 on SD's): after 1000 steps both samplers still land far off, after 3000 they do not
    # (docs/evolution.md: the same at image scale).
    ("epsilon", "linear", 3000), ("epsilon", "scaled_linear", 3000)])
def test_each_objective_trains_and_its_samplers_draw_the_data(kind, schedule, train_steps):
    """End to end on a two-mode dataset (+pattern, -pattern): diffusion_loss trains a small network, and every
    sampler that applies draws samples near a mode (a sign error, a wrong target or a wrong time map lands far off:
    noise is about as far from the modes as the pattern's norm, 3.5)."""
    from kiln.config import SchedulerConfig
    from kiln.models import pack

    torch.manual_seed(0)
    objective, sched = _objective(kind, schedule), SchedulerConfig()
    pattern = torch.randn(1, 4, 2, 2)
    model, generator = _ToyDenoiser(), torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(train_steps):
        x0 = (torch.randint(0, 2, (64, 1, 1, 1), generator=generator) * 2 - 1) * pattern
        loss, _, _ = diffusion_loss(model, x0, torch.zeros(64, 1, 4), torch.ones(64, 1, dtype=torch.bool), objective,
                                    sched, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    denoiser = Denoiser(lambda x, t: model(x, t.expand(x.shape[0]))[0], kind, make_process(objective))
    mode = pack(pattern)  # (1, 1, 16)
    for sampler in ("euler", "ddim", "ddpm") if kind == "flow" else ("ddim", "ddpm"):
        with torch.no_grad():
            x = SAMPLERS[sampler](denoiser, torch.randn(256, 1, 16, generator=generator),
                                  sampling_times(50, 1, objective, sched), generator=generator)
        distance = torch.minimum((x - mode).norm(dim=-1), (x + mode).norm(dim=-1)).mean().item()
        assert distance < 1.0, (kind, schedule, sampler, distance)
