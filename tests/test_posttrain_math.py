"""The numerical core of post-training: Diffusion-DPO, Flow-GRPO's SDE sampler and objective, the reward model."""

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from kiln.config import ModelConfig, ObjectiveConfig, SchedulerConfig
from kiln.dpo import diffusion_dpo_batch_loss, diffusion_dpo_loss, flow_matching_errors
from kiln.diffusion import Denoiser, diffusion_loss, make_process
from kiln.flow import sample_timesteps
from kiln.models import unpack
from kiln.grpo import clipped_policy_loss, gaussian_kl, group_advantages, grpo_loss
from kiln.models import build_backbone
from kiln.sampler import sample_euler, sample_sde, sde_mean_std, sde_step, sde_step_log_prob
from reward.model import RewardModel, bradley_terry_loss, pairwise_accuracy

# --------------------------------------------------------------------------- Diffusion-DPO


def test_dpo_loss_hand_computed():
    # Pair 1: errors policy chosen 0.5, policy rejected 0.7, ref chosen 0.6, ref rejected 0.6, beta 2:
    #   margin = -2 * ((0.5 - 0.7) - (0.6 - 0.6)) = 0.4; loss = -log sigmoid(0.4) = log(1 + e^-0.4)
    #   = log(1 + 0.6703200) = log 1.6703200 = 0.5130153. Implicit rewards: chosen -2 (0.5 - 0.6) = 0.2,
    #   rejected -2 (0.7 - 0.6) = -0.2.
    # Pair 2 (the policy prefers the loser): 0.6, 0.5, 0.6, 0.6: margin = -2 * (0.1 - 0) = -0.2;
    #   loss = log(1 + e^0.2) = log(1 + 1.2214028) = log 2.2214028 = 0.7981389.
    # Mean loss (0.5130153 + 0.7981389) / 2 = 0.6555771; accuracy 1/2; mean margin 0.1.
    loss, stats = diffusion_dpo_loss(torch.tensor([0.5, 0.6]), torch.tensor([0.7, 0.5]),
                                     torch.tensor([0.6, 0.6]), torch.tensor([0.6, 0.6]), beta=2.0)
    assert math.isclose(loss.item(), 0.6555771, abs_tol=1e-6)
    loss1, stats1 = diffusion_dpo_loss(torch.tensor([0.5]), torch.tensor([0.7]), torch.tensor([0.6]),
                                       torch.tensor([0.6]), beta=2.0)
    assert math.isclose(loss1.item(), 0.5130153, abs_tol=1e-6)
    assert math.isclose(stats1["rewards/chosen"].item(), 0.2, abs_tol=1e-6)
    assert math.isclose(stats1["rewards/rejected"].item(), -0.2, abs_tol=1e-6)
    assert math.isclose(stats["rewards/accuracies"].item(), 0.5)
    assert math.isclose(stats["rewards/margins"].item(), 0.1, abs_tol=1e-6)


def test_dpo_gradient_lowers_loss_when_policy_improves_on_winner():
    err_w = torch.tensor([0.5, 0.6], requires_grad=True)
    err_l, ref = torch.tensor([0.7, 0.5]), torch.tensor([0.6, 0.6])
    loss, _ = diffusion_dpo_loss(err_w, err_l, ref, ref, beta=2.0)
    loss.backward()
    # d loss / d err_w = beta * (1 - sigmoid(margin)) / B > 0: lowering the winner's error lowers the loss ...
    assert (err_w.grad > 0).all()
    lower, _ = diffusion_dpo_loss(err_w.detach() - 0.05, err_l, ref, ref, beta=2.0)
    assert lower < loss
    # ... and lowering the loser's error raises it.
    worse, _ = diffusion_dpo_loss(err_w.detach(), err_l - 0.05, ref, ref, beta=2.0)
    assert worse > loss


def _tiny_transformer(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=[4, 6, 6])
    return build_backbone(cfg, latent_channels=4, text_dim=8).eval()


def test_dpo_errors_follow_the_flow_objective_and_reference_gives_log2():
    model = _tiny_transformer()
    b, g = 3, torch.Generator().manual_seed(3)
    chosen, rejected = torch.randn(b, 4, 4, 6, generator=g), torch.randn(b, 4, 4, 6, generator=g)
    text, mask = torch.randn(b, 5, 8, generator=g), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 2 + [0] * 3]).bool()

    # flow_matching_errors is diffusion_loss's per-sample loss: replay its draws (t first, then packed noise).
    obj, sched = ObjectiveConfig(), SchedulerConfig()
    with torch.no_grad():
        _, per_sample, t = diffusion_loss(model, chosen, text, mask, obj, sched, torch.Generator().manual_seed(5))
        replay = torch.Generator().manual_seed(5)
        t2 = sample_timesteps(b, 6, obj, sched, replay)
        noise = unpack(torch.randn((b, 6, 16), generator=replay), 4, 6)  # drawn packed, as diffusion_loss does
        errors = flow_matching_errors(model, chosen, text, mask, t2, noise)
    assert torch.equal(t, t2)
    assert torch.allclose(errors, per_sample, atol=1e-6)

    # A policy equal to its reference has margin 0 on every pair: loss log 2, and gradients still flow.
    loss, stats = diffusion_dpo_batch_loss(model, copy.deepcopy(model), chosen, rejected, text, mask, t, noise,
                                           beta=500.0)
    assert math.isclose(loss.item(), math.log(2), abs_tol=1e-5)
    assert abs(stats["rewards/margins"].item()) < 1e-4
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --------------------------------------------------------------------------- Flow-GRPO SDE sampler


def test_sde_step_log_prob_hand_computed():
    # x = 1, v = -1, sigma 0.5 -> 0.25 (dt = -0.25), a = 0.7:
    #   s_t = 0.7 * sqrt(0.5 / 0.5) = 0.7
    #   drift = v + s_t^2 / (2 sigma) * (x + (1 - sigma) v) = -1 + 0.49 / 1 * (1 - 0.5) = -0.755
    #   mean = x + drift * dt = 1 + 0.18875 = 1.18875;  std = s_t * sqrt(0.25) = 0.35
    # log N(1.0; 1.18875, 0.35^2): z = -0.18875 / 0.35 = -0.5392857
    #   = -z^2/2 - log 0.35 - log(2 pi)/2 = -0.1454145 + 1.0498221 - 0.9189385 = -0.0145309
    x, v, x_next = torch.tensor([[1.0]]), torch.tensor([[-1.0]]), torch.tensor([[1.0]])
    log_prob, mean, std = sde_step_log_prob(v, x, x_next, 0.5, 0.25, noise_level=0.7)
    assert math.isclose(mean.item(), 1.18875, abs_tol=1e-6) and math.isclose(float(std), 0.35, abs_tol=1e-6)
    assert log_prob.shape == (1,) and math.isclose(log_prob.item(), -0.0145309, abs_tol=1e-6)
    assert math.isclose(log_prob.item(), torch.distributions.Normal(1.18875, 0.35).log_prob(torch.tensor(1.0)).item(),
                        abs_tol=1e-6)
    # Several elements: the per-sample log-prob is the mean over the non-batch dims (Flow-GRPO's convention).
    x4, v4, n4 = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    lp4, m4, s4 = sde_step_log_prob(v4, x4, n4, 0.5, 0.25, noise_level=0.7)
    expected = torch.distributions.Normal(m4, s4).log_prob(n4).mean(dim=(1, 2))
    assert torch.allclose(lp4, expected, atol=1e-6)


def test_sde_step_mean_std_and_draws():
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    mean, std = sde_mean_std(v, x, 0.6, 0.4, noise_level=0.0)
    assert torch.allclose(mean, x + (0.4 - 0.6) * v) and float(std) == 0  # a = 0: the Euler step
    # Drawn samples have the step's mean and std, and their returned log-prob is the density of what was drawn.
    g = torch.Generator().manual_seed(0)
    xs, vs = torch.full((20000, 1), 1.0), torch.full((20000, 1), -1.0)
    x_next, log_prob, mean, std = sde_step(vs, xs, 0.5, 0.25, noise_level=0.7, generator=g)
    assert abs(x_next.mean().item() - 1.18875) < 0.01 and abs(x_next.std().item() - 0.35) < 0.01
    again, _, _ = sde_step_log_prob(vs, xs, x_next, 0.5, 0.25, noise_level=0.7)
    assert torch.equal(again, log_prob)
    # Per-sample sigmas broadcast over the batch.
    lp_b, _, _ = sde_step_log_prob(vs[:2], xs[:2], x_next[:2], torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.25]),
                                   noise_level=0.7)
    assert torch.allclose(lp_b, log_prob[:2])


def test_sigma_one_needs_sigma_max():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_mean_std(x, x, 1.0, 0.8, noise_level=0.7)
    _, std = sde_mean_std(x, x, 1.0, 0.8, noise_level=0.7, sigma_max=0.8)
    assert math.isclose(float(std), 0.7 * math.sqrt(1 / 0.2) * math.sqrt(0.2), rel_tol=1e-6)


class _ToyVelocity(nn.Module):
    """v(x, sigma) for (B, 1, 2) "latents": an MLP standing in for the transformer."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, x, sigma):
        return self.net(torch.cat([x, torch.as_tensor(sigma).expand(*x.shape[:-1], 1)], dim=-1))


def test_sample_sde_log_probs_trajectory_and_euler_limit():
    torch.manual_seed(0)
    model, sigmas = _ToyVelocity(), torch.linspace(1, 0, 6)
    noise = torch.randn(4, 1, 2)
    with torch.no_grad():
        x0, log_probs, traj = sample_sde(_flow(model), noise, sigmas, noise_level=0.7,
                                         generator=torch.Generator().manual_seed(1))
        assert x0.shape == (4, 1, 2) and log_probs.shape == (4, 5) and traj.shape == (4, 6, 1, 2)
        assert torch.equal(traj[:, 0], noise) and torch.equal(traj[:, -1], x0)
        # Re-evaluating each stored step under the same model gives the sampler's log-probs (PPO ratio 1 on-policy).
        for j in range(5):
            lp, _, _ = sde_step_log_prob(model(traj[:, j], sigmas[j]), traj[:, j], traj[:, j + 1], sigmas[j],
                                         sigmas[j + 1], noise_level=0.7, sigma_max=sigmas[1])
            assert torch.allclose(lp, log_probs[:, j], atol=1e-6)
        # No noise: the SDE sampler is the Euler ODE sampler.
        ode = sample_euler(_flow(model), noise, sigmas)
        sde, _, _ = sample_sde(_flow(model), noise, sigmas, noise_level=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sde, ode, atol=1e-6)


# --------------------------------------------------------------------------- GRPO objective


def _flow(velocity_fn):
    """A velocity function as the samplers' denoiser."""
    return Denoiser(velocity_fn, "flow", make_process(None))


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two prompts, three generations each
    # Group 1: mean 2, Bessel std 1 -> (-1, 0, 1) / (1 + 1e-4); group 2: all equal -> 0, not NaN.
    adv = group_advantages(rewards, num_generations=3)
    assert torch.allclose(adv, torch.tensor([-1, 0, 1, 0, 0, 0]) / (1 + 1e-4))
    assert torch.equal(group_advantages(rewards, 3, scale_rewards=False), torch.tensor([-1.0, 0, 1, 0, 0, 0]))
    assert torch.equal(group_advantages(rewards, 3, scale_rewards="none"), group_advantages(rewards, 3, False))
    batch = group_advantages(rewards, 3, scale_rewards="batch")
    assert torch.allclose(batch, torch.tensor([-1.0, 0, 1, 0, 0, 0]) / (rewards.std() + 1e-4))
    with pytest.raises(ValueError, match=r"^rewards must be \(B,\) with B a multiple of num_generations=4$"):
        group_advantages(rewards, 4)


def test_clipped_objective_and_kl():
    adv = torch.tensor([1.0, 1.0, -1.0])
    # ratios e^0 = 1, e^0.5 = 1.649 (clipped at 1.2 for a positive advantage), e^-0.5 = 0.607 (clipped at 0.8 for a
    # negative one): per-sample losses -1, -1.2, 0.8 -> mean -0.4667; two of three clipped.
    log_prob = torch.tensor([0.0, 0.5, -0.5], requires_grad=True)
    loss, stats = clipped_policy_loss(log_prob, torch.zeros(3), adv, epsilon=0.2)
    assert math.isclose(loss.item(), (-1 - 1.2 + 0.8) / 3, abs_tol=1e-6)
    assert math.isclose(stats["clipfrac"].item(), 2 / 3, abs_tol=1e-6)
    loss.backward()
    # Only the unclipped sample gets a gradient, and it pushes its log-prob up (positive advantage).
    assert log_prob.grad[0] < 0 and log_prob.grad[1] == 0 and log_prob.grad[2] == 0

    # KL of two Gaussians with equal std: (m - m_ref)^2 / (2 std^2), averaged over elements:
    # means (1, 3) vs (0, 0), std 2: (1/8 + 9/8) / 2 = 0.625.
    kl = gaussian_kl(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2), torch.tensor(2.0))
    assert math.isclose(kl.item(), 0.625)
    total, stats = grpo_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), beta=0.1,
                             mean=torch.tensor([[1.0, 3.0]]), ref_mean=torch.zeros(1, 2), std=torch.tensor(2.0))
    assert math.isclose(total.item(), -1 + 0.1 * 0.625, abs_tol=1e-6) and math.isclose(stats["kl"].item(), 0.625)


def _redness(x0):
    """Toy reward: channel 0 of the (B, 1, 2) final sample, "how red the image is"."""
    return x0[:, 0, 0]


def test_nft_loss_minimiser_and_on_policy_gradient():
    """DiffusionNFT's loss is a quadratic in v with its minimum at v_old + (2r - 1) / beta (target - v_old), and at
    v = v_old its gradient is advantage-weighted flow matching: 2 beta (2r - 1)(v_old - target) / numel."""
    from kiln.grpo import ADVANTAGE_CLIP, nft_loss

    g = torch.Generator().manual_seed(0)
    old, target = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    advantages = torch.tensor([2.5, 0.0, -1.0])
    r = 0.5 + 0.5 * advantages / ADVANTAGE_CLIP
    for beta in (1.0, 0.5):
        v = old.clone().requires_grad_(True)
        nft_loss(v, old, target, advantages, beta=beta).sum().backward()
        expected = 2 * beta * (2 * r - 1)[:, None, None] * (old - target) / 8
        assert torch.allclose(v.grad, expected, atol=1e-6)
        minimiser = old + ((2 * r - 1) / beta)[:, None, None] * (target - old)
        v = minimiser.clone().requires_grad_(True)
        nft_loss(v, old, target, advantages, beta=beta).sum().backward()
        assert v.grad.abs().max() < 1e-6
    # A zero advantage (r = 1/2) leaves v_old where it is: no signal, no step.
    assert torch.equal(minimiser[1], old[1])


def test_grpo_update_moves_samples_toward_the_rewarded_colour():
    """A few Flow-GRPO updates (SDE rollouts, group advantages, clipped objective, KL) raise the mean reward.
    With the advantage's sign flipped the same updates would lower it, so this fails if the sign is wrong."""
    torch.manual_seed(0)
    model = _ToyVelocity()
    ref = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sigmas, noise_level, steps = torch.linspace(1, 0, 5), 0.7, 4
    eval_noise = torch.randn(256, 1, 2, generator=torch.Generator().manual_seed(99))

    @torch.no_grad()
    def mean_reward():
        sde = sample_sde(_flow(model), eval_noise, sigmas, noise_level=noise_level,
                         generator=torch.Generator().manual_seed(7))[0]
        return _redness(sde).mean().item(), _redness(sample_euler(_flow(model), eval_noise, sigmas)).mean().item()

    before_sde, before_ode = mean_reward()
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        with torch.no_grad():  # rollouts: 4 "prompts" x 8 generations
            x0, old_log_probs, traj = sample_sde(_flow(model), torch.randn(32, 1, 2, generator=g), sigmas,
                                                 noise_level=noise_level, generator=g)
        advantages = group_advantages(_redness(x0), num_generations=8)
        for j in range(steps):  # one optimizer step per timestep, as Flow-GRPO does
            xj, xn, s, sn = traj[:, j], traj[:, j + 1], sigmas[j], sigmas[j + 1]
            log_prob, mean, std = sde_step_log_prob(model(xj, s), xj, xn, s, sn, noise_level=noise_level,
                                                    sigma_max=sigmas[1])
            with torch.no_grad():
                ref_mean, _ = sde_mean_std(ref(xj, s), xj, s, sn, noise_level=noise_level, sigma_max=sigmas[1])
            loss, _ = grpo_loss(log_prob, old_log_probs[:, j], advantages, epsilon=0.2, beta=0.01, mean=mean,
                                ref_mean=ref_mean, std=std)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after_sde, after_ode = mean_reward()
    assert after_sde > before_sde + 0.5, (before_sde, after_sde)
    assert after_ode > before_ode + 0.5, (before_ode, after_ode)  # the deterministic sampler moved too


# --------------------------------------------------------------------------- reward model


def _render_pairs(n, seed, size=32):
    """Pairs of scenes with the same layout: chosen draws the objects red, rejected in another colour."""
    from data.synthetic import SceneSpec, render

    rng = random.Random(seed)
    chosen, rejected = [], []
    for _ in range(n):
        kind, shape = rng.choice(["single", "count"]), rng.choice(["circle", "square", "triangle"])
        count, layout_seed = (rng.randint(2, 3) if kind == "count" else 1), rng.randrange(1 << 30)
        for colour, out in (("red", chosen), (rng.choice(["green", "blue", "yellow"]), rejected)):
            image, _ = render(SceneSpec(kind, colour, shape, count), size, size, random.Random(layout_seed))
            out.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(chosen), torch.stack(rejected)  # (n, 3, size, size) each


def _random_text(n, seed, length=6, dim=16):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    return torch.randn(n, length, dim, generator=g), torch.arange(length)[None] < lengths[:, None]


def test_reward_model_learns_a_planted_preference():
    torch.manual_seed(0)
    model = RewardModel(text_dim=16)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    train_c, train_r = _render_pairs(64, seed=0)
    test_c, test_r = _render_pairs(64, seed=1)
    train_text, test_text = _random_text(64, 0), _random_text(64, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randperm(64, generator=g)[:16]
        text, mask = train_text[0][idx], train_text[1][idx]
        loss = bradley_terry_loss(model(train_c[idx], text, mask), model(train_r[idx], text, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = pairwise_accuracy(model(test_c, *test_text), model(test_r, *test_text))
    assert accuracy >= 0.9, accuracy


def test_reward_model_shapes_padding_and_bradley_terry():
    model = RewardModel(text_dim=16).eval()
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    text, mask = _random_text(2, 0)
    with torch.no_grad():
        r = model(images, text, mask)
        padded = text.masked_fill(~mask[..., None], 123.0)  # padding positions must not matter
        assert r.shape == (2,) and torch.allclose(model(images, padded, mask), r, atol=1e-6)
    # -log sigmoid(1 - 0) = log(1 + e^-1) = 0.3132617; -log sigmoid(0 - 2) = log(1 + e^2) = 2.1269280.
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert math.isclose(loss.item(), (0.3132617 + 2.1269280) / 2, abs_tol=1e-6)
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 3.0])) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- GRPO on a toy counting task

SLOTS = 4  # a toy "image": 4 slots, an object in each slot whose value is positive


class _CountVelocity(nn.Module):
    """v(x, sigma, target count) for (B, 1, SLOTS) samples."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(SLOTS + 1 + SLOTS, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(),
                                 nn.Linear(64, SLOTS))

    def forward(self, x, sigma, counts):
        cond = nn.functional.one_hot(counts, SLOTS).float()[:, None]  # (B, 1, SLOTS)
        return self.net(torch.cat([x, torch.as_tensor(sigma).expand(*x.shape[:-1], 1), cond], dim=-1))


def _objects(x):
    return (x[:, 0] > 0).sum(dim=1)  # (B,) objects "drawn"


@pytest.mark.parametrize("objective", ["flow_grpo", "nft"])
def test_grpo_with_a_count_reward_raises_count_accuracy(objective):
    """A flow model pretrained on scenes whose object count ignores the prompt draws the asked-for count only by
    chance (~0.29). The stage's GRPO recipe (one initial noise per group, SDE in a short window and ODE elsewhere,
    groups without signal dropped, window_step_losses with a KL to the reference, or DiffusionNFT's nft_loss on the
    clean samples at fresh t and noise) raises exact-count accuracy under the deterministic sampler; with the reward
    inverted the same recipe lowers it, so the test fails on a sign error."""
    from kiln.grpo import informative_groups, nft_loss, window_step_losses

    sigmas = torch.linspace(1, 0, 9)  # 8 steps
    eval_counts = torch.arange(1, 4).repeat_interleave(200)  # (600,) prompts "1", "2", "3"
    eval_noise = torch.randn(600, 1, SLOTS, generator=torch.Generator().manual_seed(5))

    def pretrained():
        torch.manual_seed(0)
        model, g = _CountVelocity(), torch.Generator().manual_seed(1)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(400):  # flow matching on +-1 slots with random signs, whatever the prompt says
            x0 = torch.randint(0, 2, (256, 1, SLOTS), generator=g).float() * 2 - 1
            noise, t = torch.randn(x0.shape, generator=g), torch.rand(256, 1, 1, generator=g)
            counts = torch.randint(1, 4, (256,), generator=g)
            loss = (model((1 - t) * x0 + t * noise, t, counts) - (noise - x0)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    def accuracy(model):
        with torch.no_grad():
            x0 = sample_euler(_flow(lambda x, s: model(x, s, eval_counts)), eval_noise, sigmas)
        return (_objects(x0) == eval_counts).float().mean().item()

    def train(model, sign, steps=40, prompts=8, group=8):
        ref = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        g, rng = torch.Generator().manual_seed(2), random.Random(3)
        ratio_devs = []
        for _ in range(steps):
            counts = torch.randint(1, 4, (prompts,), generator=g).repeat_interleave(group)  # (B,)
            noise = torch.randn(prompts, 1, SLOTS, generator=g).repeat_interleave(group, 0)  # one start per group
            start = rng.randrange(3)
            with torch.no_grad():
                x0, old_log_probs, traj = sample_sde(_flow(lambda x, s: model(x, s, counts)), noise, sigmas,
                                                     noise_level=0.7, generator=g, window=(start, start + 2))
            rewards = sign * (_objects(x0) == counts).float()
            keep = informative_groups(rewards, group)
            if not keep.any():
                continue
            advantages = group_advantages(rewards, group)[keep]
            kept = counts[keep]
            opt.zero_grad()
            if objective == "nft":  # two (t, noise) draws per clean sample, the sampling policy as v_old
                for _ in range(2):
                    x, t = x0[keep], torch.rand(len(kept), 1, 1, generator=g)
                    eps = torch.randn(x.shape, generator=g)
                    x_t = (1 - t) * x + t * eps
                    velocity = model(x_t, t, kept)
                    loss = nft_loss(velocity, velocity.detach(), eps - x, advantages).mean()
                    loss = loss + 0.01 * (velocity - ref(x_t, t, kept)).pow(2).mean()
                    (loss / 2).backward()
                opt.step()
                ratio_devs.append(0.0)  # no step log-probs: nothing to check
                continue
            for loss, stats in window_step_losses(
                    lambda x, s: model(x, s, kept), lambda x, s: ref(x, s, kept), traj[keep], old_log_probs[keep],
                    advantages, sigmas, start, range(2), noise_level=0.7, beta=0.01):
                (loss / 2).backward()
                ratio_devs.append(stats["ratio_dev"].item())
            opt.step()
        return max(ratio_devs)

    before = accuracy(pretrained())
    assert 0.15 < before < 0.45, before  # chance: 4/16, 6/16, 4/16 for 1, 2, 3 of 4 slots
    learner = pretrained()
    ratio_dev = train(learner, sign=1.0)
    assert ratio_dev < 1e-5, ratio_dev  # one pass per rollout: on-policy, importance ratio exactly 1
    after = accuracy(learner)
    unlearner = pretrained()
    train(unlearner, sign=-1.0)
    inverted = accuracy(unlearner)
    # measured 0.33 -> 0.58 and 0.01 inverted (flow_grpo); 0.33 -> 0.46 and 0.10 inverted (nft)
    assert after > before + 0.1, (before, after)
    assert inverted < before - 0.15, (before, inverted)
