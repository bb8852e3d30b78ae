"""Flow-GRPO's objective: group-normalised advantages, the PPO-style clipped surrogate and the per-step Gaussian KL
to the reference model. Pure torch; the SDE sampler and step log-probs live in kiln/sampler.py.

Parameter names follow TRL's GRPOConfig: `num_generations` (group size), `scale_rewards`, `epsilon`,
`epsilon_high`, `beta`. One training step of a stored trajectory (Flow-GRPO's inner loop, per timestep j):

    v = model(trajectory[:, j], sigmas[j])
    log_prob, mean, std = sde_step_log_prob(v, trajectory[:, j], trajectory[:, j + 1], sigmas[j], sigmas[j + 1], ...)
    ref_mean = sde_mean_std(ref_model(...), trajectory[:, j], sigmas[j], sigmas[j + 1], ...)[0]   # no grad
    loss, stats = grpo_loss(log_prob, old_log_probs[:, j], advantages, beta=beta, mean=mean, ref_mean=ref_mean, std=std)

`informative_groups` marks the groups whose rewards differ (the others carry no signal and are skipped) and
`window_step_losses` yields that loss for each trained step of a rollout sampled with kiln/sampler.py's
`sample_sde(..., window=...)`: the stage and the toy test share it.

`nft_loss` is the other objective the stage offers (grpo.objective: nft): DiffusionNFT trains the same groups and
advantages on the forward process (fresh t and noise for each sampled image), without step log-probs.
"""

from __future__ import annotations

import torch

from kiln.sampler import sde_mean_std, sde_step_log_prob


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str | bool = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """(B,) advantages (r - mean_group) / (std_group + eps) for rewards (B,) laid out as TRL lays them out: B / G
    prompts, each repeated G = num_generations times in a row.

    scale_rewards: "group" or True divides by the group's std; "batch" by the whole batch's std; "none" or False
    only centres (Dr. GRPO). std is Bessel-corrected and eps is 1e-4, as in TRL's GRPOTrainer."""
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if rewards.ndim != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be (B,) with B a multiple of num_generations={num_generations}")
    grouped = rewards.float().view(-1, num_generations)  # (B/G, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # (B,)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if num_generations > 1 else None
    elif scale == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else None
    else:
        std = None
    # A group whose rewards are all equal gets advantage 0 (centred), never a division by zero.
    return advantages if std is None else advantages / (std + eps)


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *,
                        epsilon: float = 0.2, epsilon_high: float | None = None):
    """PPO's clipped surrogate, -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A), averaged over the
    batch. log_prob, old_log_prob, advantages: (B,); ratio = exp(log_prob - old_log_prob) per SDE step.
    Returns (loss, stats) with stats detached 0-d tensors: clip fraction, approx KL to the sampling policy
    (0.5 * mean (log-ratio)^2, Flow-GRPO's diagnostic) and mean ratio."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = torch.maximum(unclipped, clipped).mean()  # the pessimistic bound: clipping only ever removes gain
    with torch.no_grad():
        stats = {
            "clipfrac": ((ratio < 1 - epsilon) | (ratio > 1 + epsilon_high)).float().mean(),
            "approx_kl": 0.5 * (log_prob - old_log_prob).pow(2).mean(),
            "ratio": ratio.mean(),
        }
    return loss, stats


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std) -> torch.Tensor:
    """(B,) KL(N(mean, std^2) || N(ref_mean, std^2)) of one SDE step, averaged over the non-batch dims like the
    log-probs. Both policies share the step's std, so the KL is (mean - ref_mean)^2 / (2 std^2).

    Flow-GRPO's train script divides by 2 s_t^2 without the |dt| in the step variance, i.e. its KL is this one times
    |dt|; here it is the exact Gaussian KL, so a beta taken from Flow-GRPO's configs corresponds to beta / |dt|."""
    kl = (mean - ref_mean.detach()).pow(2) / (2 * torch.as_tensor(std, dtype=mean.dtype, device=mean.device) ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, mean=None, ref_mean=None, std=None):
    """Flow-GRPO's per-step loss: clipped surrogate + beta * KL to the reference model (mean, ref_mean: (B, ...)
    step means under the policy and the frozen reference, std the step's std; needed only when beta > 0).
    Returns (loss, stats); stats adds "policy_loss" and, with beta > 0, "kl"."""
    policy_loss, stats = clipped_policy_loss(log_prob, old_log_prob, advantages, epsilon=epsilon,
                                             epsilon_high=epsilon_high)
    stats["policy_loss"] = policy_loss.detach()
    if beta <= 0:
        return policy_loss, stats
    if mean is None or ref_mean is None or std is None:
        raise ValueError("beta > 0 needs the policy's and the reference's step means and the step std")
    kl = gaussian_kl(mean, ref_mean, std).mean()
    stats["kl"] = kl.detach()
    return policy_loss + beta * kl, stats


def informative_groups(rewards: torch.Tensor, num_generations: int, tol: float = 1e-6) -> torch.Tensor:
    """(B,) bool: True for the rows of groups whose rewards are not all equal. A group of equal rewards has zero
    advantage everywhere: training on it spends compute and, with a KL term, only pulls towards the reference."""
    grouped = rewards.float().view(-1, num_generations)  # (B/G, G)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    return (spread > tol).repeat_interleave(num_generations)


# DiffusionNFT's advantage clip: r = 0.5 + 0.5 * clamp(A / ADVANTAGE_CLIP, -1, 1) maps group-normalised advantages
# (|A| <= (G - 1) / sqrt(G), 2.5 for a group of 8) into [0, 1] without saturating.
ADVANTAGE_CLIP = 5.0


def nft_loss(velocity: torch.Tensor, old_velocity: torch.Tensor, target: torch.Tensor, advantages: torch.Tensor, *,
             beta: float = 1.0):
    """DiffusionNFT's per-sample objective (Zheng et al. 2025, "Online Diffusion Reinforcement with Forward
    Process"): velocity, old_velocity (the policy that sampled the images, detached), target (noise - x0): (B, N, D)
    at one x_t; advantages (B,). Returns (B,) losses.

    With r = 0.5 + 0.5 clamp(A / ADVANTAGE_CLIP, -1, 1), the implicit positive policy (1 - beta) v_old + beta v is fit
    to the image with weight r and the implicit negative (1 + beta) v_old - beta v with weight 1 - r. The minimiser is
    v = v_old + (2r - 1) / beta (target - v_old): towards an image with A > 0, away from one with A < 0, by at most
    1 / beta of the way, so the step is bounded without a ratio to clip. At v = v_old the gradient is
    2 beta (2r - 1)(v_old - target): advantage-weighted flow matching (the policy gradient with the ELBO for the
    log-likelihood), whose noise is that of pretraining's loss rather than of an SDE step's Gaussian."""
    r = (0.5 + 0.5 * (advantages / ADVANTAGE_CLIP).clamp(-1, 1)).to(velocity.dtype)  # (B,)
    old_velocity = old_velocity.detach()
    positive = (1 - beta) * old_velocity + beta * velocity
    negative = (1 + beta) * old_velocity - beta * velocity
    dims = tuple(range(1, velocity.ndim))
    return r * (positive - target).pow(2).mean(dim=dims) + (1 - r) * (negative - target).pow(2).mean(dim=dims)


def window_step_losses(policy, reference, trajectory: torch.Tensor, old_log_probs: torch.Tensor,
                       advantages: torch.Tensor, sigmas: torch.Tensor, start: int, steps, *, noise_level: float,
                       epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0):
    """Yields (loss, stats) for each trained step k of a rollout's SDE window (k indexes the window: denoising step
    start + k). policy, reference: fn(x, sigma) -> velocity (reference may be None when beta is 0 and no KL is
    wanted); trajectory (B, n + 1, ...), old_log_probs (B, n) from sample_sde; advantages (B,); sigmas the whole
    schedule. The caller backpropagates each loss (gradients accumulate step by step, so memory holds one step).

    stats: the surrogate's (clipfrac, approx_kl, ratio, policy_loss), "ratio_dev" (max |ratio - 1|: 0 on the first
    pass over a fresh rollout, the on-policy check) and "kl" to the reference whenever a reference is given."""
    sigma_max = sigmas[1]
    for k in steps:
        j = start + k
        x_j, x_next = trajectory[:, k], trajectory[:, k + 1]
        log_prob, mean, std = sde_step_log_prob(policy(x_j, sigmas[j]), x_j, x_next, sigmas[j], sigmas[j + 1],
                                                noise_level=noise_level, sigma_max=sigma_max)
        ref_mean = None
        if reference is not None:
            with torch.no_grad():
                ref_mean = sde_mean_std(reference(x_j, sigmas[j]), x_j, sigmas[j], sigmas[j + 1],
                                        noise_level=noise_level, sigma_max=sigma_max)[0]
        loss, stats = grpo_loss(log_prob, old_log_probs[:, k], advantages, epsilon=epsilon, epsilon_high=epsilon_high,
                                beta=beta, mean=mean, ref_mean=ref_mean, std=std)
        if reference is not None and "kl" not in stats:  # logged even when it is not penalised
            stats["kl"] = gaussian_kl(mean.detach(), ref_mean, std).mean()
        stats["ratio_dev"] = (log_prob.detach() - old_log_probs[:, k]).exp().sub(1).abs().max()
        yield loss, stats
