"""Scoring generated or curated images against their captions: the one scorer factory behind the data funnel's
alignment check, the preference stage's judge and the GRPO reward.

A scorer combines named components with weights: `verifier` (reward/verifier.py: the fraction of the caption's
checks the image passes), `verifier_dense` (the same checks with partial credit, reward/verifier.py's
partial_score), `reward_model` (the learned reward model a reward stage trained, loaded once) and `alignment` (the
cosine of image and caption on a features stage's contrastive scorer, task captions).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.generate import to_pil
from kiln.images import image_tensor
from kiln.text_encoder import text_encoder_for
from reward.model import RewardModel, load_reward_model

COMPONENTS = ("verifier", "verifier_dense", "reward_model", "alignment")


def reward_scores(cfg, model: RewardModel, images, captions: list[str], device) -> torch.Tensor:
    """(B,) rewards for PIL images or a (B, 3, H, W) tensor in [-1, 1], and their captions."""
    if not isinstance(images, torch.Tensor):
        images = torch.stack([image_tensor(image) for image in images])
    text, mask = text_encoder_for(cfg, device)(captions)
    return model(images.to(device), text, mask)


def make_scorer(cfg, weights: dict[str, float], reward_model: Path | str | None, device, features=None):
    """score(images, captions) -> (total (B,), {component: (B,)}), total = the weighted sum of the components named
    in `weights`. images: PIL images or a (B, 3, H, W) tensor in [-1, 1]; reward_model: a reward stage's output
    folder, needed when weights name 'reward_model'; features: a features stage's output folder, needed for
    'alignment'. Scores are float32 on the CPU."""
    unknown = set(weights) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"scorer: unknown component(s) {sorted(unknown)}, expected some of {list(COMPONENTS)}")
    model = None
    if "reward_model" in weights:
        if reward_model is None:
            raise ValueError("scorer: the 'reward_model' component needs a reward stage output folder")
        model = load_reward_model(Path(reward_model), device)
    aligned = None
    if "alignment" in weights:
        from kiln.contrastive import alignment_scorer

        aligned = alignment_scorer(cfg, features, device)

    @torch.no_grad()
    def score(images, captions: list[str]):
        parts = {}
        from reward.verifier import partial_score, score as verify

        checks = [(name, check) for name, check in (("verifier", verify), ("verifier_dense", partial_score))
                  if name in weights]
        pil = to_pil(images) if checks and isinstance(images, torch.Tensor) else images
        for name, check in checks:
            parts[name] = torch.tensor([check(image, text) for image, text in zip(pil, captions)])
        if model is not None:
            parts["reward_model"] = reward_scores(cfg, model, images, captions, device).float().cpu()
        if aligned is not None:
            parts["alignment"] = aligned(images, captions)
        total = sum(weights[name] * value for name, value in parts.items())
        return total, parts

    return score
