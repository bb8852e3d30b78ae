"""A small learned reward model: (image, frozen caption embedding) -> scalar, trained on preference pairs with the
Bradley-Terry loss (as TRL's RewardTrainer does). Pure torch; about 0.1M parameters at the defaults.

Image: a strided conv encoder with two coordinate channels (so pooled features still know where things are, which
relation prompts need). Text: masked mean of the frozen token embeddings. The text vector queries the image
features (attention pooling: "red" can pick out red regions), and a small MLP scores the pair.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.checkpoint import load_network


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens, (B, L) mask (bool or 0/1) -> (B, D) mean over the real tokens."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class RewardModel(nn.Module):
    """r(image, text) -> (B,). images: (B, 3, H, W) in [-1, 1] (any H, W); text: (B, L, text_dim); mask: (B, L)."""

    def __init__(self, text_dim: int, channels: tuple[int, ...] = (16, 32, 64), hidden: int = 64):
        super().__init__()
        layers, prev = [], 3 + 2  # RGB + (x, y) coordinate channels
        for ch in channels:  # each conv halves the resolution
            layers += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), nn.SiLU()]
            prev = ch
        self.encoder = nn.Sequential(*layers)
        self.image_proj = nn.Linear(prev, hidden)
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden))
        self.head = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, images: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, -1, -1, -1)  # (B, 2, H, W)
        feats = self.encoder(torch.cat([images, coords], dim=1))  # (B, C, H/8, W/8)
        feats = self.image_proj(feats.flatten(2).transpose(1, 2))  # (B, P, hidden), P = positions
        query = self.text_proj(masked_mean(text, mask))  # (B, hidden)
        attn = F.softmax(feats @ query.unsqueeze(-1) / feats.shape[-1] ** 0.5, dim=1)  # (B, P, 1)
        attended = (attn * feats).sum(dim=1)  # (B, hidden): the regions the caption asks about
        pooled = feats.mean(dim=1)  # (B, hidden): the whole image
        return self.head(torch.cat([attended, pooled, attended * query], dim=-1)).squeeze(-1)  # (B,)


def load_reward_model(reward_dir: Path, device="cpu") -> RewardModel:
    """A reward stage's output folder -> the trained RewardModel (eval mode, frozen)."""
    return load_network(reward_dir, "reward_model",
                        lambda arch: RewardModel(arch["text_dim"], tuple(arch["channels"]), arch["hidden"]), "reward",
                        device)


def bradley_terry_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, margin=None) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected [- margin]), averaged; rewards (B,). TRL's RewardTrainer loss."""
    diff = rewards_chosen - rewards_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


@torch.no_grad()
def pairwise_accuracy(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> float:
    """Fraction of pairs the model ranks correctly (ties count as wrong)."""
    return (rewards_chosen > rewards_rejected).float().mean().item()
