"""A contrastive text-image scorer for captioned images (CLIP's recipe at toy scale): a small image encoder trained
so each image's vector is nearest its own caption's among a batch, against the frozen text encoder's token
embeddings (masked mean, then a learned linear map). Its uses, for task captions: the alignment of a generated image
to its caption (cosine), held-out retrieval accuracy for real images, and its image vectors as the Frechet distance's
features (Inception's part in FID, which cannot be downloaded here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.features import SIZE
from reward.model import masked_mean


class ContrastiveScorer(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> unit vectors (B, dim); text (B, L, text_dim), mask (B, L) -> (B, dim)."""

    def __init__(self, text_dim: int, dim: int = 64):
        super().__init__()
        self.image_body = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.SiLU(),  # (B, 32, 32, 32)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),  # (B, 64, 16, 16)
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(),  # (B, 128, 8, 8)
            nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.SiLU(),  # (B, 128, 4, 4)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, dim),  # (B, dim)
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def image_vectors(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (SIZE, SIZE):
            images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.image_body(images), dim=-1)

    def text_vectors(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(masked_mean(text.float(), mask)), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The Frechet distance's features (kiln.features.features_of calls the network)."""
        return self.image_vectors(images)

    def loss(self, images, text, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE over the batch, and the fraction of images whose own caption ranks first."""
        logits = self.logit_scale.exp().clamp(max=100) * self.image_vectors(images) @ self.text_vectors(text, mask).T
        target = torch.arange(len(images), device=images.device)  # (B,): image i belongs with caption i
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, (logits.argmax(1) == target).float().mean()


@torch.no_grad()
def alignment(scorer: ContrastiveScorer, images: torch.Tensor, text, mask, batch_size: int = 64) -> torch.Tensor:
    """(N,) cosine between each image and its own caption."""
    out = []
    for i in range(0, len(images), batch_size):
        rows = slice(i, i + batch_size)
        out.append((scorer.image_vectors(images[rows]) * scorer.text_vectors(text[rows], mask[rows])).sum(-1))
    return torch.cat(out)


@torch.no_grad()
def retrieval_accuracy(scorer: ContrastiveScorer, images: torch.Tensor, text, mask, captions: list[str]) -> float:
    """Fraction of images whose nearest of all N captions is their own caption's text (chance: about 1/N)."""
    image_vectors = torch.cat([scorer.image_vectors(images[i:i + 64]) for i in range(0, len(images), 64)])
    nearest = (image_vectors @ scorer.text_vectors(text, mask).T).argmax(1).tolist()  # (N,) caption index
    return sum(captions[j] == caption for j, caption in zip(nearest, captions)) / len(captions)


def alignment_scorer(cfg, features_dir, device="cpu"):
    """score(images (PIL list or (B, 3, H, W) in [-1, 1]), captions) -> (B,) cosine on a features stage's
    contrastive scorer, the captions embedded by the frozen text encoder."""
    from pathlib import Path

    from kiln.features import load_feature_net
    from kiln.images import image_tensor
    from kiln.text_encoder import text_encoder_for

    if features_dir is None:
        raise ValueError("alignment: needs the features stage's contrastive scorer (task captions)")
    scorer = load_feature_net(Path(features_dir), device)
    if not isinstance(scorer, ContrastiveScorer):
        raise ValueError(f"alignment: {features_dir} holds a synthetic-scene classifier, not a contrastive scorer")
    encoder = text_encoder_for(cfg, device)

    @torch.no_grad()
    def score(images, captions: list[str]) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            images = torch.stack([image_tensor(image) for image in images])
        text, mask = encoder(captions)
        vectors = scorer.image_vectors(images.to(device).float())
        return (vectors * scorer.text_vectors(text, mask)).sum(-1).float().cpu()

    return score
