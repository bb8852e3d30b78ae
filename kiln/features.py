"""Image features for a Frechet distance between generated and real images, from a network the project trains.

FID needs a feature network; Inception's weights cannot be downloaded here, so `FeatureNet` (a small CNN) is trained
on the data stage's real images to name what a scene holds (data/labels.py: which colour-shape pairs appear, how
many objects, which scene kind). Its pooled features before those heads play Inception's pool3 features' part.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SIZE = 64  # px: every image is resized to this before the network, so features compare across resolutions


class FeatureNet(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> features (B, dim); heads predict the scene labels during training: which of
    n_pairs colour-shape pairs appear (multi-hot), which of n_counts object counts, which of n_kinds scene kinds."""

    def __init__(self, dim: int, n_pairs: int, n_counts: int, n_kinds: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.SiLU(),  # (B, 32, 32, 32)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),  # (B, 64, 16, 16)
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(),  # (B, 128, 8, 8)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, dim), nn.SiLU(),  # (B, dim)
        )
        self.pairs, self.objects = nn.Linear(dim, n_pairs), nn.Linear(dim, n_counts)
        self.kinds = nn.Linear(dim, n_kinds)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (SIZE, SIZE):
            images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.body(images)

    def loss(self, images, present, objects, kinds) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and the fraction of images whose every label is right."""
        features = self(images)
        pair_logits, object_logits, kind_logits = self.pairs(features), self.objects(features), self.kinds(features)
        loss = (F.binary_cross_entropy_with_logits(pair_logits, present) + F.cross_entropy(object_logits, objects)
                + F.cross_entropy(kind_logits, kinds))
        right = ((pair_logits > 0) == (present > 0.5)).all(1) & (object_logits.argmax(1) == objects) & \
            (kind_logits.argmax(1) == kinds)
        return loss, right.float().mean()


def load_feature_net(features_dir, device="cpu") -> nn.Module:
    """A features stage's output folder -> its trained network (eval mode, frozen): a FeatureNet (task synthetic) or
    a kiln.contrastive.ContrastiveScorer (task captions)."""
    from data.labels import LABEL_SIZES
    from kiln.checkpoint import load_network
    from kiln.contrastive import ContrastiveScorer

    def build(arch: dict) -> nn.Module:
        if arch.get("kind") == "contrastive":
            return ContrastiveScorer(arch["text_dim"], arch["dim"])
        return FeatureNet(arch["dim"], *LABEL_SIZES)

    return load_network(features_dir, "feature_net", build, "features", device)


@torch.no_grad()
def features_of(net: FeatureNet, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, dim) float64 features."""
    net.eval()
    return torch.cat([net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).double().cpu().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D): |mu_a - mu_b|^2 +
    Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the FID formula (Heusel et al. 2017)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # near-singular product: nudge both covariances, as pytorch-fid does
        eps = 1e-6 * np.eye(len(cov_a))
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))
