"""Programmatic, GenEval-like verifier for the synthetic scene grammar.

Pipeline: classify pixels to a palette colour by hue (low-saturation pixels are
background), clean each colour mask with a small morphological opening, split it into
connected components, drop tiny ones, and name each component's shape from its geometry.
Thresholds are loose enough for blurry, slightly off-colour images decoded from a VAE.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from data.synthetic import COLOUR_RGB, COLOURS, SceneSpec, parse_caption

# Pixels below this HSV saturation (or too dark to have a reliable hue) are background.
# About half-way between the background (~0.02) and the palette (~0.85), so a blurred
# edge is split near its middle and shapes keep their geometry.
MIN_SATURATION = 0.30
MIN_VALUE = 0.20
# Components smaller than this fraction of the image are noise, not objects.
MIN_AREA_FRACTION = 0.004

# Palette hues in PIL's HSV scale (0..255 for a full turn, h * 255).
PALETTE_HUES = np.array(
    [colorsys.rgb_to_hsv(*(c / 255 for c in COLOUR_RGB[name]))[0] * 255 for name in COLOURS]
)


@dataclass(frozen=True)
class Detection:
    """One detected object: palette colour, shape name, centroid (pixels), area (pixels)."""

    colour: str
    shape: str  # "circle" | "square" | "triangle" | "other" (implausible blob)
    cx: float
    cy: float
    area: int


def _to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 array, got {array.shape} {array.dtype}")
    return array


def _colour_index_map(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel palette index by nearest hue; -1 for background (unsaturated or dark)."""
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).astype(np.int16)
    foreground = (hsv[..., 1] >= MIN_SATURATION * 255) & (hsv[..., 2] >= MIN_VALUE * 255)
    index = np.full(foreground.shape, -1, dtype=np.int8)
    diff = np.abs(hsv[..., 0][foreground][:, None] - PALETTE_HUES)
    hue_distance = np.minimum(diff, 255 - diff)  # hue is circular: red sits at both ends
    index[foreground] = np.argmin(hue_distance, axis=1)
    return index


# A y-skewness this negative means mass sits low in the blob: an upward triangle
# (ideal -0.57; circles and squares ~0 even when blurred and noisy).
TRIANGLE_MAX_SKEW = -0.15
# A blob whose best template overlap is below this is not one of our shapes
# (e.g. two objects merged, or a smear).
MIN_TEMPLATE_IOU = 0.6
# Blur rounds a square's corners towards a circle but never squares a circle, so a
# square wins ties: measured circle-minus-square IoU is >= 0.08 for circles and
# <= 0.03 for squares, even at Gaussian blur radius 2 on 64 px images.
SQUARE_TIE_BONUS = 0.05


def _template_ious(component: np.ndarray) -> dict[str, float]:
    """IoU of the component with an ideal circle, square and upward triangle of the same
    area and centroid. Area and centroid are robust to blur and ragged edges, unlike
    the bounding box."""
    ys, xs = np.nonzero(component)
    area = len(xs)
    side = np.sqrt(area)  # square of the same area
    radius = np.sqrt(area / np.pi)  # circle of the same area
    tri_side = np.sqrt(2 * area)  # triangle with base = height, as rendered
    pad = int(np.ceil(tri_side)) + 1  # room for templates that poke out of the bbox
    height, width = component.shape
    canvas = np.zeros((height + 2 * pad, width + 2 * pad), dtype=bool)
    canvas[pad : pad + height, pad : pad + width] = component
    yy, xx = np.mgrid[0 : canvas.shape[0], 0 : canvas.shape[1]]
    x = xx - (xs.mean() + pad)
    y = yy - (ys.mean() + pad)
    depth = y + 2 * tri_side / 3  # distance below the apex; the centroid is 2/3 down
    templates = {
        "circle": x * x + y * y <= radius * radius,
        "square": (np.abs(x) <= side / 2) & (np.abs(y) <= side / 2),
        "triangle": (depth >= 0) & (depth <= tri_side) & (np.abs(x) <= depth / 2),
    }
    ious = {}
    for shape, template in templates.items():
        overlap = np.count_nonzero(canvas & template)
        ious[shape] = overlap / (area + np.count_nonzero(template) - overlap)
    return ious


def _classify_shape(component: np.ndarray) -> str:
    """Name a component's shape from its cropped binary mask.

    Upward triangles are recognised by their bottom-heavy mass (negative y skewness),
    which survives blur that rounds off the apex; otherwise the best-overlapping
    template (circle, square, triangle) wins. "other" if nothing fits well.
    """
    ys = np.nonzero(component)[0].astype(float)
    ys -= ys.mean()
    spread = (ys**2).mean()
    skew = (ys**3).mean() / spread**1.5 if spread > 0 else 0.0
    ious = _template_ious(component)
    preference = dict(ious, square=ious["square"] + SQUARE_TIE_BONUS)
    shape = "triangle" if skew < TRIANGLE_MAX_SKEW else max(preference, key=preference.get)
    return shape if ious[shape] >= MIN_TEMPLATE_IOU else "other"


def _open(mask: np.ndarray, side: int) -> np.ndarray:
    """Binary opening with a side x side square (separable min/max filters: fast for any side)."""
    eroded = ndimage.minimum_filter(mask.view(np.uint8), size=side, mode="nearest")
    return ndimage.maximum_filter(eroded, size=side, mode="nearest").astype(bool)


def detect_objects(image: Image.Image | np.ndarray) -> list[Detection]:
    """Detect coloured shapes, sorted left to right (then top to bottom)."""
    rgb = _to_rgb_array(image)
    height, width = rgb.shape[:2]
    index_map = _colour_index_map(rgb)
    # Opening removes speckle and thin bridges; odd square window, ~3 px at 64-128 px.
    side = 2 * max(1, round(min(height, width) / 96)) + 1
    min_area = MIN_AREA_FRACTION * height * width

    detections = []
    for colour_index, colour in enumerate(COLOURS):
        mask = index_map == colour_index
        if not mask.any():
            continue
        mask = _open(mask, side)
        labels, n_components = ndimage.label(mask)
        if n_components == 0:
            continue
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[box] == label
            area = int(component.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(component)
            detections.append(
                Detection(
                    colour=colour,
                    shape=_classify_shape(component),
                    cx=float(xs.mean() + box[1].start),
                    cy=float(ys.mean() + box[0].start),
                    area=area,
                )
            )
    return sorted(detections, key=lambda d: (d.cx, d.cy))


@dataclass(frozen=True)
class Verdict:
    colour: bool
    shape: bool
    count: bool
    relation: bool | None  # None for scenes without a relation
    correct: bool
    detections: list[Detection] = field(default_factory=list)
    spec: SceneSpec | None = None

    def checks(self) -> list[bool]:
        """The applicable checks, in a fixed order."""
        return [c for c in (self.colour, self.shape, self.count, self.relation) if c is not None]


def _relation_holds(relation: str, subject: Detection, other: Detection) -> bool:
    """Centroids agree with the relation along its axis, and that axis dominates."""
    dx, dy = other.cx - subject.cx, other.cy - subject.cy
    primary, across = {
        "left of": (dx, dy),
        "right of": (-dx, dy),
        "above": (dy, dx),  # image y grows downwards
        "below": (-dy, dx),
    }[relation]
    return primary > 0 and primary > abs(across)


def _locate(
    detections: list[Detection], colour: str, shape: str, fall_back_to_colour: bool
) -> Detection | None:
    """Largest detection of the pair; optionally the largest of the colour if the pair is missing."""
    exact = [d for d in detections if (d.colour, d.shape) == (colour, shape)]
    if not exact and fall_back_to_colour:
        exact = [d for d in detections if d.colour == colour]
    return max(exact, key=lambda d: d.area, default=None)


def verify(image: Image.Image | np.ndarray, caption_or_spec: str | SceneSpec) -> Verdict:
    """Check an image against a caption (or spec).

    Checks (relation only applies to relation scenes):
      colour:   every described colour has at least one detected object of that colour.
      shape:    every described (colour, shape) pair is detected with that shape.
      count:    each described pair is detected exactly as many times as described
                (1 for singles and for each relation object, N for counts) and there
                are no other objects, e.g. a single scene must hold exactly one object.
      relation: the subject's centroid is on the described side of the other object's
                centroid, and that displacement dominates the perpendicular one. Objects
                are matched by (colour, shape); if a pair is missing and the two objects
                differ in colour, the largest object of that colour stands in, so a
                wrong shape does not also fail the relation.
      correct:  all applicable checks pass.
    """
    spec = parse_caption(caption_or_spec) if isinstance(caption_or_spec, str) else caption_or_spec
    detections = detect_objects(image)
    pairs = spec.pairs()
    found_colours = {d.colour for d in detections}
    found_pairs = [(d.colour, d.shape) for d in detections]

    colour_ok = all(colour in found_colours for colour, _ in pairs)
    shape_ok = all(pair in found_pairs for pair in pairs)
    count_ok = len(detections) == spec.count * len(pairs) and all(
        found_pairs.count(pair) == spec.count for pair in pairs
    )

    relation_ok = None
    if spec.kind == "relation":
        by_colour = spec.colour != spec.other_colour
        subject = _locate(detections, spec.colour, spec.shape, by_colour)
        other = _locate(detections, spec.other_colour, spec.other_shape, by_colour)
        relation_ok = (
            subject is not None
            and other is not None
            and _relation_holds(spec.relation, subject, other)
        )

    checks = [colour_ok, shape_ok, count_ok] + ([relation_ok] if relation_ok is not None else [])
    return Verdict(
        colour=colour_ok,
        shape=shape_ok,
        count=count_ok,
        relation=relation_ok,
        correct=all(checks),
        detections=detections,
        spec=spec,
    )


def score(image: Image.Image | np.ndarray, caption: str | SceneSpec) -> float:
    """Fraction of applicable checks passed, in [0, 1]; usable as a reward."""
    checks = verify(image, caption).checks()
    return sum(checks) / len(checks)


def partial_score(image: Image.Image | np.ndarray, caption: str | SceneSpec) -> float:
    """Dense reward in [0, 1]: the mean of per-check partial credits, so a near miss scores above a far one (three
    squares for "four squares" above one square), which a policy gradient can climb where the 0/1 checks are flat.

      colour:   fraction of the described colours found.
      shape:    fraction of the described (colour, shape) pairs found.
      count:    1 - (sum over pairs of |found - described| + objects not described) / described objects, >= 0.
      relation: 1 if it holds, 0.5 if both objects are found on the wrong side, 0 if one is missing.
    Equals score() when every check passes or every check fails outright."""
    verdict = verify(image, caption)
    spec, detections = verdict.spec, verdict.detections
    pairs = spec.pairs()
    found_pairs = [(d.colour, d.shape) for d in detections]
    found_colours = {d.colour for d in detections}
    colour = sum(c in found_colours for c, _ in pairs) / len(pairs)
    shape = sum(pair in found_pairs for pair in pairs) / len(pairs)
    described = spec.count * len(pairs)
    found = [found_pairs.count(pair) for pair in pairs]
    errors = sum(abs(n - spec.count) for n in found) + (len(detections) - sum(found))  # + undescribed objects
    credits = [colour, shape, max(0.0, 1 - errors / described)]
    if spec.kind == "relation":
        both = all(_locate(detections, c, s, spec.colour != spec.other_colour) is not None for c, s in pairs)
        credits.append(1.0 if verdict.relation else 0.5 if both else 0.0)
    return sum(credits) / len(credits)
