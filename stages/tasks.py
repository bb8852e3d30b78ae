"""The task seam: what a run's data means to the stages that judge images. Preference and GRPO ask the task for
training prompts, GRPO for held-out prompts and how to score its probe; neither reads the synthetic world directly.

- SyntheticTask: the grammar's training compositions (never a held-out pair or triple), held-out compositions, and
  the programmatic verifier.
- CaptionsTask (your own images): captions of the curated training split, captions of the held-out split, and the
  features stage's contrastive scorer (cosine of image and caption).

The eval stage's two halves (stages/eval.py, stages/eval_captions.py) and SFT's selection follow cfg.task_kind too.
"""

from __future__ import annotations

import random
from pathlib import Path


from data.synthetic import KINDS, caption, eval_prompts, make_holdout, render_near_miss, sample_spec
from kiln import seeding
from kiln.contrastive import alignment_scorer


class SyntheticTask:
    kind = "synthetic"

    def __init__(self, cfg):
        self.cfg = cfg
        self.holdout = make_holdout(cfg.data.holdout_seed)

    def training_prompts(self, n: int, seed: int, kinds=KINDS) -> list[tuple[str, str]]:
        """n (kind, caption) training prompts, kinds in turn (single, count, relation, ...)."""
        rng = random.Random(seed)
        out = []
        for i in range(n):
            spec = sample_spec(rng, self.holdout, "train", kinds[i % len(kinds)])
            out.append((spec.kind, caption(spec, rng)))
        return out

    def near_miss_pairs(self, n: int, seed: int, kinds, resolution: int) -> list[tuple[str, str, object, object]]:
        """n (kind, caption, scene, near miss) training scenes rendered at resolution x resolution, kinds in turn:
        PIL images that differ in one checked property (data/synthetic.py's render_near_miss)."""
        rng = random.Random(seed)
        out = []
        for i in range(n):
            spec = sample_spec(rng, self.holdout, "train", kinds[i % len(kinds)])
            scene, miss, _ = render_near_miss(spec, resolution, resolution, self.holdout, rng)
            out.append((spec.kind, caption(spec, rng), scene, miss))
        return out

    def heldout_prompts(self, n: int, seed: int, kinds=KINDS) -> list[str]:
        """n held-out compositions of the given kinds (the same for the same seed)."""
        kinds = [k for k in KINDS if k in kinds]
        per_kind = -(-n // len(kinds))
        specs = [s for s in eval_prompts(self.holdout, "heldout", per_kind, seed) if s.kind in kinds][:n]
        rng = random.Random(seeding.grpo_probe(seed))
        return [caption(spec, rng) for spec in specs]

    def probe_scores(self, images, captions: list[str]) -> dict[str, float]:
        """The verifier on PIL images: all checks right, and the mean fraction of checks passed."""
        from reward.verifier import verify

        verdicts = [verify(image, text) for image, text in zip(images, captions)]
        return {"heldout_correct": sum(v.correct for v in verdicts) / len(verdicts),
                "heldout_score": sum(sum(v.checks()) / len(v.checks()) for v in verdicts) / len(verdicts)}


class CaptionsTask:
    kind = "captions"

    def __init__(self, cfg, data_dir: Path, features_dir: Path | None, device="cpu"):
        from stages.features import one_per_image, shuffled

        self.cfg, self.device = cfg, device
        self.captions = [s["caption"] for s in one_per_image(Path(data_dir) / "shards", load_images=False)]
        held = shuffled(one_per_image(Path(data_dir) / "heldout", load_images=False), cfg.eval.seed)
        self.heldout = [s["caption"] for s in held]
        self.features_dir, self._alignment = features_dir, None

    def training_prompts(self, n: int, seed: int, kinds=None) -> list[tuple[str, str]]:
        """n captions of training images, drawn without replacement while they last (kind "caption")."""
        rng = random.Random(seed)
        picks = rng.sample(self.captions, n) if n <= len(self.captions) else rng.choices(self.captions, k=n)
        return [("caption", text) for text in picks]

    def heldout_prompts(self, n: int, seed: int, kinds=None) -> list[str]:
        """The first n held-out captions in the eval stage's seeded order (the ones it draws first)."""
        return self.heldout[:n]

    def probe_scores(self, images, captions: list[str]) -> dict[str, float]:
        """Mean alignment (cosine on the contrastive scorer) of PIL images with their captions."""
        if self._alignment is None:
            self._alignment = alignment_scorer(self.cfg, self.features_dir, self.device)
        return {"heldout_score": float(self._alignment(images, captions).mean())}


def task_for(cfg, inputs: dict, device="cpu"):
    """The task of this config, given a stage's inputs (task captions reads the data and features stages')."""
    if cfg.task_kind == "synthetic":
        return SyntheticTask(cfg)
    if not inputs.get("data"):
        raise ValueError("task captions: this stage needs the data stage's output (its training and held-out split)")
    return CaptionsTask(cfg, Path(inputs["data"]), inputs.get("features"), device)
