"""Diffusion-DPO in velocity space (Wallace et al. 2023, adapted to flow matching as in Qwen-Image's report).

For a chosen (winner) and a rejected (loser) latent of the same prompt, noised with the SAME noise at the SAME t,
each model's flow-matching error is the per-sample MSE between its predicted velocity and the target noise - x0.
The policy should lower its error on the chosen image more than the frozen reference does, relative to the
rejected one:

    loss = -log sigmoid(-beta * ((err_chosen - err_rejected) - (ref_err_chosen - ref_err_rejected)))

Wallace et al.'s released code writes the factor as -0.5 * beta_dpo; here beta is the whole factor (the Qwen-Image
report's form), so beta = 0.5 * beta_dpo. Parameter names follow TRL's DPO (chosen / rejected, beta).
Pure torch: no Prefect, no MLflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.flow import velocity_errors
from kiln.geometry import token_grid
from kiln.models import pack


def diffusion_dpo_loss(policy_chosen_err: torch.Tensor, policy_rejected_err: torch.Tensor,
                       ref_chosen_err: torch.Tensor, ref_rejected_err: torch.Tensor, beta: float):
    """The four (B,) per-sample flow-matching errors -> (mean loss, stats).

    stats (detached 0-d tensors, TRL's DPO metric names): implicit rewards of the chosen and rejected samples,
    r = -beta * (err_policy - err_ref), their margin (the logit inside the sigmoid) and the implicit reward
    accuracy, the fraction of pairs with a positive margin. With policy == reference every margin is 0 and the
    loss is log 2."""
    reward_chosen = -beta * (policy_chosen_err - ref_chosen_err.detach())  # (B,)
    reward_rejected = -beta * (policy_rejected_err - ref_rejected_err.detach())  # (B,)
    margin = reward_chosen - reward_rejected  # = -beta * (policy diff - ref diff)
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {
            "rewards/chosen": reward_chosen.mean(),
            "rewards/rejected": reward_rejected.mean(),
            "rewards/margins": margin.mean(),
            "rewards/accuracies": (margin > 0).float().mean(),
        }
    return loss, stats


def flow_matching_errors(model, latents: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample velocity MSE, exactly kiln.diffusion.diffusion_loss's per-sample loss for a given t and noise.

    latents, noise: (B, C, h, w) normalised x0 and its noise; text: (B, L, D); mask: (B, L); t: (B,) in [0, 1]."""
    _, _, h, w = latents.shape
    return velocity_errors(model, pack(latents), pack(noise), t, text, mask, token_grid(h, w))  # packed: (B, N, C*4)


def preference_errors(model, chosen: torch.Tensor, rejected: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                      t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(err_chosen (B,), err_rejected (B,)) for pairs sharing prompt, noise and t, in one forward pass of 2B.

    chosen, rejected, noise: (B, C, h, w) (one bucket: MSRoPE reads one shape per batch); text (B, L, D),
    mask (B, L), t (B,). Sharing noise and t makes the pair's error difference measure the images, not the draw."""
    errors = flow_matching_errors(model, torch.cat([chosen, rejected]), torch.cat([text, text]),
                                  torch.cat([mask, mask]), torch.cat([t, t]), torch.cat([noise, noise]))
    return errors.chunk(2)


def diffusion_dpo_batch_loss(model, ref_model, chosen, rejected, text, mask, t, noise, beta: float):
    """Diffusion-DPO loss and stats for a batch of pairs (shapes as in preference_errors); the reference runs
    without gradients."""
    policy_chosen, policy_rejected = preference_errors(model, chosen, rejected, text, mask, t, noise)
    with torch.no_grad():
        ref_chosen, ref_rejected = preference_errors(ref_model, chosen, rejected, text, mask, t, noise)
    return diffusion_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
