"""Image tensors in the layout the VAE, the reward model and the feature network all read."""

from __future__ import annotations

import numpy as np
import torch


def image_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
