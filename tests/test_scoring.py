"""The one scorer behind the funnel's alignment check, the preference judge and the GRPO reward."""

import random

import pytest
import torch

from data.synthetic import SceneSpec, render
from kiln.config import load_config
from kiln.images import image_tensor
from reward.scoring import make_scorer


def _scenes():
    rng = random.Random(0)
    images = [render(SceneSpec("single", colour, "circle"), 64, 64, rng)[0] for colour in ("red", "blue")]
    return images, ["a red circle", "a red circle"]


def test_verifier_scores_are_weighted_and_read_pil_images_or_tensors():
    images, captions = _scenes()
    score = make_scorer(load_config("smoke"), {"verifier": 0.5}, None, "cpu")
    total, parts = score(images, captions)
    assert parts["verifier"].tolist() == [1.0, 0.0]  # the blue circle is no red circle
    assert torch.equal(total, 0.5 * parts["verifier"])
    from_tensor, _ = score(torch.stack([image_tensor(image) for image in images]), captions)  # (B, 3, H, W)
    assert torch.equal(from_tensor, total)


def test_a_reward_model_component_needs_a_folder_and_unknown_components_are_named():
    cfg = load_config("smoke")
    with pytest.raises(ValueError, match="reward_model"):
        make_scorer(cfg, {"reward_model": 1.0}, None, "cpu")
    with pytest.raises(ValueError, match="clip"):
        make_scorer(cfg, {"clip": 1.0}, None, "cpu")
