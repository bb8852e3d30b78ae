import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data.synthetic import (
    COLOURS,
    INVERSE_RELATION,
    SHAPES,
    SceneSpec,
    caption,
    make_holdout,
    render,
    sample_spec,
)
from reward.verifier import Verdict, detect_objects, score, verify

HOLDOUT = make_holdout(seed=0)


def _scenes(n: int, size: tuple[int, int], seed: int):
    """(spec, image, placed objects) for a mix of training and held-out scenes of all kinds."""
    rng = random.Random(seed)
    scenes = []
    for i in range(n):
        spec = sample_spec(rng, HOLDOUT, "train" if i % 2 else "heldout")
        image, objects = render(spec, *size, rng)
        scenes.append((spec, image, objects))
    return scenes


def _degrade(image: Image.Image, blur_radius: float, noise_std: float, rng) -> Image.Image:
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur_radius)), dtype=np.float32)
    noisy = blurred + rng.normal(0, noise_std, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(64, 64), (128, 128)])
def test_ground_truth_scenes_verify(size):
    scenes = _scenes(300, size, seed=size[0])
    text_rng = random.Random(0)
    verdicts = [verify(image, caption(spec, text_rng)) for spec, image, _ in scenes]
    accuracy = np.mean([v.correct for v in verdicts])
    assert accuracy >= 0.97, accuracy
    assert {s.kind for s, _, _ in scenes} == {"single", "count", "relation"}


def test_detections_match_rendered_objects():
    for spec, image, objects in _scenes(100, (96, 64), seed=1):
        detections = detect_objects(image)
        assert len(detections) == len(objects), spec
        for placed in objects:
            nearest = min(detections, key=lambda d: (d.cx - placed.cx) ** 2 + (d.cy - placed.cy) ** 2)
            assert (nearest.colour, nearest.shape) == (placed.colour, placed.shape)
            # A triangle's centroid sits size/6 below the centre of its bounding square.
            expected_cy = placed.cy + (placed.size / 6 if placed.shape == "triangle" else 0)
            assert abs(nearest.cx - placed.cx) < 1 and abs(nearest.cy - expected_cy) < 1


def test_accepts_numpy_arrays_and_specs():
    spec, image, _ = _scenes(1, (64, 64), seed=2)[0]
    from_array = verify(np.asarray(image), spec)
    assert isinstance(from_array, Verdict) and from_array.correct
    assert score(image, spec) == 1.0
    with pytest.raises(ValueError, match=r"^expected an HxWx3 uint8 array, got \(8, 8\) uint8$"):
        detect_objects(np.zeros((8, 8), dtype=np.uint8))


def test_blank_image_fails_everything():
    blank = Image.new("RGB", (64, 64), (245, 245, 240))
    verdict = verify(blank, "a red square left of a blue circle")
    assert verdict.detections == []
    assert not any(verdict.checks())
    assert score(blank, "two green triangles") == 0.0


def test_relation_is_none_for_non_relation_scenes():
    spec, image, _ = next(s for s in _scenes(20, (64, 64), seed=3) if s[0].kind != "relation")
    assert verify(image, spec).relation is None
    assert len(verify(image, spec).checks()) == 3


# --------------------------------------------------------------------------- mismatches


def _swap_colour(spec: SceneSpec, rng) -> SceneSpec:
    used = {c for c, _ in spec.pairs()}
    return replace(spec, colour=rng.choice([c for c in COLOURS if c not in used]))


def _swap_shape(spec: SceneSpec, rng) -> SceneSpec:
    taken = set(spec.pairs())
    options = [s for s in SHAPES if (spec.colour, s) not in taken]
    return replace(spec, shape=rng.choice(options))


def _wrong_count(spec: SceneSpec, rng) -> SceneSpec:
    if spec.kind == "relation":
        return SceneSpec("count", spec.colour, spec.shape, rng.randint(2, 4))
    count = rng.choice([n for n in range(1, 5) if n != spec.count])
    return SceneSpec("single" if count == 1 else "count", spec.colour, spec.shape, count)


def _flip_relation(spec: SceneSpec, rng) -> SceneSpec:
    return replace(spec, relation=INVERSE_RELATION[spec.relation])


@pytest.mark.parametrize(
    "mismatch, kinds",
    [
        (_swap_colour, {"single", "count", "relation"}),
        (_swap_shape, {"single", "count", "relation"}),
        (_wrong_count, {"single", "count", "relation"}),
        (_flip_relation, {"relation"}),
    ],
)
def test_mismatched_captions_fail(mismatch, kinds):
    rng = random.Random(4)
    scenes = [s for s in _scenes(240, (64, 64), seed=5) if s[0].kind in kinds]
    passes = [verify(image, caption(mismatch(spec, rng), rng)).correct for spec, image, _ in scenes]
    assert len(passes) >= 50
    assert np.mean(passes) <= 0.1, (mismatch.__name__, np.mean(passes))


def test_score_is_partial_credit():
    image, _ = render(SceneSpec("count", "blue", "square", 3), 64, 64, random.Random(6))
    assert score(image, "three blue squares") == 1.0
    assert score(image, "two blue squares") == pytest.approx(2 / 3)  # only the count fails
    assert score(image, "three blue circles") == pytest.approx(1 / 3)  # shape and count fail
    assert score(image, "three red circles") == 0.0


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("size, blur_radius", [((64, 64), 1.0), ((128, 128), 2.0)])
def test_robust_to_blur_and_noise(size, blur_radius):
    noise_rng = np.random.default_rng(7)
    scenes = _scenes(150, size, seed=8)
    verdicts = [verify(_degrade(image, blur_radius, 8.0, noise_rng), spec) for spec, image, _ in scenes]
    assert np.mean([v.correct for v in verdicts]) >= 0.9
    assert np.mean([sum(v.checks()) / len(v.checks()) for v in verdicts]) >= 0.95


def test_partial_score_gives_near_misses_partial_credit():
    import random

    from data.synthetic import parse_caption, render
    from reward.verifier import partial_score, score

    image, _ = render(parse_caption("three red squares"), 128, 128, random.Random(0))
    assert partial_score(image, "three red squares") == score(image, "three red squares") == 1.0
    # Colour and shape right; count off by one: 1 - 1/2 for two, 1 - 1/4 for four; the 0/1 count check gives 0.
    assert partial_score(image, "two red squares") == pytest.approx((1 + 1 + 0.5) / 3)
    assert partial_score(image, "four red squares") == pytest.approx((1 + 1 + 0.75) / 3)
    assert score(image, "two red squares") == score(image, "four red squares") == pytest.approx(2 / 3)
    assert partial_score(image, "three blue circles") == 0.0  # nothing described is there, and 3 objects too many
    # A relation with both objects found on the wrong side: half credit for the relation check.
    pair, _ = render(parse_caption("a red circle left of a blue square"), 128, 128, random.Random(1))
    assert partial_score(pair, "a red circle right of a blue square") == pytest.approx((1 + 1 + 1 + 0.5) / 4)
