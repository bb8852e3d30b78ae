"""What a synthetic scene holds, as the labels the Frechet-distance feature network (kiln/features.py) learns to
predict from the image: which of the grammar's colour-shape pairs appear, how many objects, which scene kind."""

from __future__ import annotations

import torch

from data.synthetic import COLOURS, KINDS, SHAPES, SceneSpec

PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
MAX_OBJECTS = 4
LABEL_SIZES = (len(PAIRS), MAX_OBJECTS, len(KINDS))  # FeatureNet's head sizes: pairs, object counts, kinds


def scene_labels(spec: SceneSpec) -> tuple[torch.Tensor, int, int]:
    """(which pairs appear (len(PAIRS),) multi-hot, number of objects - 1, kind index)."""
    present = torch.zeros(len(PAIRS))
    for pair in spec.pairs():
        present[PAIRS.index(pair)] = 1.0
    objects = spec.count if spec.kind == "count" else len(spec.pairs())
    return present, objects - 1, KINDS.index(spec.kind)
