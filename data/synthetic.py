"""Synthetic captioned scenes: coloured shapes with counts and spatial relations.

Everything here is deterministic given a seed (or a seeded ``random.Random``),
so datasets, held-out splits and evaluation prompts can be regenerated exactly.

Scene kinds
    single    one object                       "a red circle"
    count     2..4 identical objects           "three blue squares"
    relation  two objects in a spatial layout  "a green triangle left of a yellow circle"

Compositional hold-out: a few colour-shape pairs and some relation triples never
appear in training images, so evaluation can measure compositional generalisation.

Canonical relations: "B right of A" is the same scene as "A left of B", and
"B below A" the same as "A above B". ``SceneSpec.normalised()`` rewrites a relation
scene to its canonical form (relation "left of" or "above"); ``parse_caption``
always returns canonical specs, so ``parse_caption(caption(s)) == s.normalised()``.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, replace
from typing import Literal

from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "count", "relation")

# Saturated, far-apart hues so the verifier can separate them by hue alone.
COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
}
BACKGROUND_RGB = (245, 245, 240)
# Colours a training set may add (data.extra_colours), each drawn with every shape. They are never evaluated and the
# verifier cannot read them (its hues are COLOURS'), so they sit away from those hues. Why add them: a shape seen in
# more colours is a shape the model has to draw from its own word, not from the colour's usual shapes.
EXTRA_COLOUR_RGB = {
    "purple": (140, 50, 200),
    "cyan": (20, 185, 200),
    "pink": (235, 70, 170),
    "black": (30, 30, 30),
}
PALETTE_RGB = {**COLOUR_RGB, **EXTRA_COLOUR_RGB}

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# Shapes a training set may add (data.extra_shapes), each drawn in every colour: never evaluated, unread by the
# verifier. Why: a colour seen in more shapes is a colour the model cannot use to guess the shape.
EXTRA_SHAPES = ("diamond", "cross")
PLURALS = {shape: shape + "s" for shape in SHAPES} | {"diamond": "diamonds", "cross": "crosses"}

# Each relation paired with the equivalent relation seen from the other object.
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CANONICAL_RELATIONS = ("left of", "above")

# Scene-kind mix used when sampling without an explicit kind.
KIND_WEIGHTS = {"single": 0.4, "count": 0.3, "relation": 0.3}

Pair = tuple[str, str]  # (colour, shape)
Triple = tuple[str, str, str, str, str]  # (colour, shape, relation, other_colour, other_shape)


@dataclass(frozen=True)
class SceneSpec:
    """What a scene contains; relation scenes read "<colour shape> <relation> <other>"."""

    kind: str
    colour: str
    shape: str
    count: int = 1
    relation: str | None = None
    other_colour: str | None = None
    other_shape: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown scene kind {self.kind!r}")
        if self.colour not in PALETTE_RGB or self.shape not in PLURALS:
            raise ValueError(f"unknown colour/shape {self.colour!r}/{self.shape!r}")
        if self.kind == "count":
            if not 2 <= self.count <= 4:
                raise ValueError(f"count scenes need 2..4 objects, got {self.count}")
        elif self.count != 1:
            raise ValueError(f"{self.kind} scenes have count 1, got {self.count}")
        if self.kind == "relation":
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}")
            if self.other_colour not in PALETTE_RGB or self.other_shape not in PLURALS:
                raise ValueError(f"unknown other colour/shape {self.other_colour!r}/{self.other_shape!r}")
            if (self.colour, self.shape) == (self.other_colour, self.other_shape):
                # Two identical objects would make the relation ambiguous.
                raise ValueError("relation objects must differ in colour or shape")
        elif (self.relation, self.other_colour, self.other_shape) != (None, None, None):
            raise ValueError(f"{self.kind} scenes take no relation fields")

    def pairs(self) -> list[Pair]:
        """The (colour, shape) pairs in the scene, subject first for relations."""
        if self.kind == "relation":
            return [(self.colour, self.shape), (self.other_colour, self.other_shape)]
        return [(self.colour, self.shape)]

    def verifiable(self) -> bool:
        """Every colour and shape is one the verifier reads (COLOURS, SHAPES), not a training-only extra."""
        return all(colour in COLOURS and shape in SHAPES for colour, shape in self.pairs())

    def normalised(self) -> SceneSpec:
        """Canonical form: relations become "left of" / "above" (objects swapped if needed)."""
        if self.kind != "relation" or self.relation in CANONICAL_RELATIONS:
            return self
        return replace(
            self,
            colour=self.other_colour,
            shape=self.other_shape,
            relation=INVERSE_RELATION[self.relation],
            other_colour=self.colour,
            other_shape=self.shape,
        )

    def triple(self) -> Triple:
        """Canonical relation triple (only for relation scenes)."""
        if self.kind != "relation":
            raise ValueError("only relation scenes have a relation triple")
        s = self.normalised()
        return (s.colour, s.shape, s.relation, s.other_colour, s.other_shape)


@dataclass(frozen=True)
class Holdout:
    """Compositions kept out of training: colour-shape pairs and canonical relation triples."""

    pairs: frozenset[Pair]
    relations: frozenset[Triple]

    def train_pairs(self) -> tuple[Pair, ...]:
        return _train_pairs(self)

    def train_triples(self) -> tuple[Triple, ...]:
        return _train_triples(self)

    def is_training_spec(self, spec: SceneSpec) -> bool:
        if any(pair in self.pairs for pair in spec.pairs()):
            return False
        return spec.kind != "relation" or spec.triple() not in self.relations


def _all_triples(pairs: tuple[Pair, ...]) -> list[Triple]:
    """Canonical triples between two different pairs, in a fixed (sorted) order."""
    return [
        (a[0], a[1], rel, b[0], b[1])
        for a in pairs
        for b in pairs
        if a != b
        for rel in CANONICAL_RELATIONS
    ]


# Cached, sorted views: frozenset order depends on string hashing, so never iterate one
# directly when drawing random choices.
@functools.lru_cache(maxsize=64)
def _train_pairs(holdout: Holdout) -> tuple[Pair, ...]:
    return tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in holdout.pairs)


@functools.lru_cache(maxsize=64)
def _train_triples(holdout: Holdout) -> tuple[Triple, ...]:
    return tuple(t for t in _all_triples(_train_pairs(holdout)) if t not in holdout.relations)


@functools.lru_cache(maxsize=64)
def _train_pairs_with(holdout: Holdout, extra_colours: tuple[str, ...], extra_shapes: tuple[str, ...] = ()
                      ) -> tuple[Pair, ...]:
    """The training pairs of COLOURS x SHAPES, then every pair with an extra colour or an extra shape."""
    unknown = [c for c in extra_colours if c not in EXTRA_COLOUR_RGB]
    if unknown:
        raise ValueError(f"unknown extra colour(s) {unknown}, expected some of {list(EXTRA_COLOUR_RGB)}")
    unknown = [s for s in extra_shapes if s not in EXTRA_SHAPES]
    if unknown:
        raise ValueError(f"unknown extra shape(s) {unknown}, expected some of {list(EXTRA_SHAPES)}")
    return _train_pairs(holdout) + tuple((c, s) for c in COLOURS + extra_colours for s in SHAPES + extra_shapes
                                         if c in extra_colours or s in extra_shapes)


@functools.lru_cache(maxsize=64)
def _train_triples_with(holdout: Holdout, extra_colours: tuple[str, ...], extra_shapes: tuple[str, ...] = ()
                        ) -> tuple[Triple, ...]:
    pairs = _train_pairs_with(holdout, extra_colours, extra_shapes)  # no extras: _train_pairs(holdout), same order
    return tuple(t for t in _all_triples(pairs) if t not in holdout.relations)


@functools.lru_cache(maxsize=64)
def _heldout_triples(holdout: Holdout) -> tuple[Triple, ...]:
    return tuple(sorted(holdout.relations))


def make_holdout(seed: int, n_pairs: int = 3, n_relations: int | None = None) -> Holdout:
    """Seeded hold-out split.

    Held-out pairs use distinct colours and distinct shapes, so every colour and shape
    keeps at least two training pairs. Held-out relation triples are drawn from the
    canonical triples between training pairs (default: 10% of them).
    """
    if not 0 <= n_pairs <= min(len(COLOURS), len(SHAPES)):
        raise ValueError(f"n_pairs must be in 0..{min(len(COLOURS), len(SHAPES))}")
    rng = random.Random(seed)
    colours = rng.sample(COLOURS, n_pairs)
    shapes = rng.sample(SHAPES, n_pairs)
    held_pairs = frozenset(zip(colours, shapes))

    train_pairs = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in held_pairs)
    for colour in COLOURS:
        assert sum(c == colour for c, _ in train_pairs) >= 2, colour
    for shape in SHAPES:
        assert sum(s == shape for _, s in train_pairs) >= 2, shape

    candidates = _all_triples(train_pairs)
    if n_relations is None:
        n_relations = round(0.1 * len(candidates))
    held_relations = frozenset(rng.sample(candidates, n_relations))
    return Holdout(pairs=held_pairs, relations=held_relations)


def _oriented(triple: Triple, rng: random.Random) -> SceneSpec:
    """A relation spec for a canonical triple, randomly stated from either object's side."""
    colour, shape, relation, other_colour, other_shape = triple
    spec = SceneSpec("relation", colour, shape, 1, relation, other_colour, other_shape)
    if rng.random() < 0.5:
        spec = SceneSpec(
            "relation", other_colour, other_shape, 1, INVERSE_RELATION[relation], colour, shape
        )
    return spec


def sample_spec(
    rng: random.Random,
    holdout: Holdout,
    split: Literal["train", "heldout"],
    kind: str | None = None,
    extra_colours: tuple[str, ...] = (),
    extra_shapes: tuple[str, ...] = (),
) -> SceneSpec:
    """Draw a scene spec.

    train:   only training compositions (no held-out pair anywhere, no held-out triple); extra_colours (names of
             EXTRA_COLOUR_RGB) join the training pairs with every shape, extra_shapes (of EXTRA_SHAPES) with every
             colour.
    heldout: single/count scenes of a held-out pair; relation scenes are held-out triples.
    Relation specs use any of the four relations (not necessarily canonical).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if kind is None:
        kind = rng.choices(KINDS, weights=[KIND_WEIGHTS[k] for k in KINDS])[0]
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}")

    if kind == "relation":
        triples = _train_triples_with(holdout, tuple(extra_colours), tuple(extra_shapes)) if split == "train" \
            else _heldout_triples(holdout)
        if not triples:
            raise ValueError(f"holdout has no {split} relation triples")
        return _oriented(rng.choice(triples), rng)

    pairs = _train_pairs_with(holdout, tuple(extra_colours), tuple(extra_shapes)) if split == "train" \
        else tuple(sorted(holdout.pairs))
    if not pairs:
        raise ValueError(f"holdout has no {split} pairs")
    colour, shape = rng.choice(pairs)
    count = rng.randint(2, 4) if kind == "count" else 1
    return SceneSpec(kind, colour, shape, count)


# --------------------------------------------------------------------------- captions

SINGLE_TEMPLATES = (
    "a {c} {s}",
    "one {c} {s}",
    "a single {c} {s}",
    "a {c} {s} on a plain background",
)
COUNT_TEMPLATES = (
    "{w} {c} {p}",
    "{d} {c} {p}",
    "a group of {w} {c} {p}",
    "{w} {c} {p} on a plain background",
)
RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "beneath"),
}


def caption(spec: SceneSpec, rng: random.Random) -> str:
    """A random phrasing of the scene; relation scenes may be stated from either side."""
    if spec.kind == "single":
        return rng.choice(SINGLE_TEMPLATES).format(c=spec.colour, s=spec.shape)
    if spec.kind == "count":
        return rng.choice(COUNT_TEMPLATES).format(
            w=COUNT_WORDS[spec.count], d=spec.count, c=spec.colour, p=PLURALS[spec.shape]
        )
    subject, other = spec.pairs()
    relation = spec.relation
    if rng.random() < 0.5:  # say "B right of A" instead of "A left of B"
        subject, other, relation = other, subject, INVERSE_RELATION[relation]
    phrase = rng.choice(RELATION_PHRASES[relation])
    return f"a {subject[0]} {subject[1]} {phrase} a {other[0]} {other[1]}"


def _alternation(words) -> str:
    # Longest first so e.g. "to the left of" wins over "left of".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_C = f"({_alternation(PALETTE_RGB)})"
_S = f"({_alternation(PLURALS)})"
_P = f"({_alternation(PLURALS.values())})"
_ARTICLE = "(?:a|an|one|a single)"
_PHRASE_TO_RELATION = {p: rel for rel, phrases in RELATION_PHRASES.items() for p in phrases}
_SINGLE_RE = re.compile(f"^{_ARTICLE} {_C} {_S}$")
_COUNT_RE = re.compile(f"^(?:a group of )?({_alternation(COUNT_WORDS.values())}|[1-4]) {_C} {_P}$")
_RELATION_RE = re.compile(
    f"^{_ARTICLE} {_C} {_S} ({_alternation(_PHRASE_TO_RELATION)}) {_ARTICLE} {_C} {_S}$"
)
_SUFFIX = " on a plain background"
_WORD_TO_COUNT = {w: n for n, w in COUNT_WORDS.items()}
_PLURAL_TO_SHAPE = {p: s for s, p in PLURALS.items()}


def parse_caption(text: str) -> SceneSpec:
    """Parse any caption the grammar emits into a canonical (normalised) SceneSpec.

    Case-insensitive; punctuation and extra whitespace are ignored.
    Raises ValueError("cannot parse caption: '<text>'") for anything else.
    """
    cleaned = " ".join(re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split())
    if cleaned.endswith(_SUFFIX):
        cleaned = cleaned[: -len(_SUFFIX)]

    if m := _SINGLE_RE.match(cleaned):
        return SceneSpec("single", m[1], m[2])
    if m := _COUNT_RE.match(cleaned):
        count = int(m[1]) if m[1].isdigit() else _WORD_TO_COUNT[m[1]]
        if count >= 2:  # "one red circles" is not a sentence the grammar produces
            return SceneSpec("count", m[2], _PLURAL_TO_SHAPE[m[3]], count)
    if m := _RELATION_RE.match(cleaned):
        if (m[1], m[2]) != (m[4], m[5]):
            spec = SceneSpec("relation", m[1], m[2], 1, _PHRASE_TO_RELATION[m[3]], m[4], m[5])
            return spec.normalised()
    raise ValueError(f"cannot parse caption: {text!r}")


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class PlacedObject:
    """A drawn object: centre and side of its bounding square, in pixels.

    (cx, cy) is the bounding-square centre, not the centroid: a triangle's centroid
    lies size/6 lower.
    """

    colour: str
    shape: str
    cx: float
    cy: float
    size: int


# Object side as a fraction of min(width, height), keyed by object count; smaller for
# crowded scenes. Single objects are large so that circle, square and triangle differ
# over many latent cells (at 128 px a side of 0.34-0.48 is 5-8 cells of an 8x VAE):
# shape is then a large part of the loss, not a few corner pixels.
SIZE_RANGES = {1: (0.34, 0.48), 2: (0.26, 0.34), 3: (0.22, 0.28), 4: (0.19, 0.25)}
# Relation objects: two must fit one object-side apart along the relation's axis.
RELATION_SIZE_RANGE = (0.24, 0.32)
MAX_PLACEMENT_TRIES = 300
MIN_OBJECT_SIDE = 4


@dataclass
class _Box:
    x0: int
    y0: int
    side: int

    @property
    def centre(self) -> tuple[float, float]:
        half = (self.side - 1) / 2
        return self.x0 + half, self.y0 + half


def _separated(a: _Box, b: _Box, gap: int) -> bool:
    """Boxes are apart by at least `gap` pixels along some axis."""
    return (
        a.x0 + a.side + gap <= b.x0
        or b.x0 + b.side + gap <= a.x0
        or a.y0 + a.side + gap <= b.y0
        or b.y0 + b.side + gap <= a.y0
    )


def _relation_clear(relation: str, a: _Box, b: _Box) -> bool:
    """`a relation b` holds with a clear margin: the primary offset is at least one
    object size and the perpendicular offset at most 30% of it."""
    (ax, ay), (bx, by) = a.centre, b.centre
    primary, across = {
        "left of": (bx - ax, by - ay),
        "right of": (ax - bx, by - ay),
        "above": (by - ay, bx - ax),
        "below": (ay - by, bx - ax),
    }[relation]
    return primary >= max(a.side, b.side) and abs(across) <= 0.3 * primary


def _random_box(side: int, width: int, height: int, pad: int, rng: random.Random) -> _Box:
    return _Box(rng.randint(pad, width - pad - side), rng.randint(pad, height - pad - side), side)


def _layout(spec: SceneSpec, width: int, height: int, rng: random.Random) -> list[_Box]:
    n_objects = 2 if spec.kind == "relation" else spec.count
    short = min(width, height)
    pad = max(1, round(0.03 * short))  # keep shapes off the image border
    gap = max(3, round(0.06 * short))  # space between shapes so they never touch
    lo, hi = RELATION_SIZE_RANGE if spec.kind == "relation" else SIZE_RANGES[n_objects]
    base = rng.uniform(lo, hi) * short

    while True:
        sides = [max(MIN_OBJECT_SIDE, round(base * rng.uniform(0.9, 1.1))) for _ in range(n_objects)]
        if max(sides) + 2 * pad > short:
            raise ValueError(f"image {width}x{height} is too small to render {spec}")
        for _ in range(MAX_PLACEMENT_TRIES):
            boxes = [_random_box(side, width, height, pad, rng) for side in sides]
            if not all(_separated(a, b, gap) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
                continue
            if spec.kind == "relation" and not _relation_clear(spec.relation, boxes[0], boxes[1]):
                continue
            return boxes
        if base <= MIN_OBJECT_SIDE:
            raise ValueError(f"could not lay out {spec} in {width}x{height}")
        base *= 0.85  # crowded: shrink and try again


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: _Box, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box.x0, box.y0, box.x0 + box.side - 1, box.y0 + box.side - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":  # upward-pointing, filling its bounding square
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "diamond":  # a square on its corner
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    else:  # cross: a plus sign with arms a third of the side wide
        third = box.side / 3
        draw.rectangle((x0 + third, y0, x1 - third, y1), fill=fill)
        draw.rectangle((x0, y0 + third, x1, y1 - third), fill=fill)


def render(
    spec: SceneSpec, width: int, height: int, rng: random.Random
) -> tuple[Image.Image, list[PlacedObject]]:
    """Draw the scene on a plain light background (no anti-aliasing, no noise).

    Objects never overlap, keep a gap between them and stay inside the image. For
    relation scenes the first object is the subject: "A left of B" draws A to the left.
    """
    objects = spec.pairs() * spec.count  # count is 1 except for count scenes
    return _draw_scene(list(zip(objects, _layout(spec, width, height, rng))), width, height)


def _draw_scene(objects: list[tuple[Pair, _Box]], width: int, height: int) -> tuple[Image.Image, list[PlacedObject]]:
    image = Image.new("RGB", (width, height), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    placed = []
    for (colour, shape), box in objects:
        _draw_shape(draw, shape, box, PALETTE_RGB[colour])
        cx, cy = box.centre
        placed.append(PlacedObject(colour, shape, cx, cy, box.side))
    return image, placed


def render_near_miss(spec: SceneSpec, width: int, height: int, holdout: Holdout, rng: random.Random
                     ) -> tuple[Image.Image, Image.Image, SceneSpec]:
    """The scene and a near miss of it: the same layout with one checked property wrong, so that a preference pair
    (scene chosen, near miss rejected) differs in that property alone. (image, near-miss image, near-miss spec).

    single: another of the colour's training shapes in the same place (never a held-out pair);
    count: one object fewer or one more (the larger layout drawn with one object left out);
    relation: the two objects in each other's places (the inverse relation)."""
    if spec.kind == "single":
        others = [s for c, s in holdout.train_pairs() if c == spec.colour and s != spec.shape]
        if not others:
            raise ValueError(f"no training shape besides {spec.shape!r} for {spec.colour!r}")
        wrong = replace(spec, shape=rng.choice(others))
        box = _layout(spec, width, height, rng)[0]
        return (_draw_scene([(spec.pairs()[0], box)], width, height)[0],
                _draw_scene([(wrong.pairs()[0], box)], width, height)[0], wrong)
    if spec.kind == "relation":
        a, b = _layout(spec, width, height, rng)
        first, second = spec.pairs()
        wrong = replace(spec, relation=INVERSE_RELATION[spec.relation])
        return (_draw_scene([(first, a), (second, b)], width, height)[0],
                _draw_scene([(first, b), (second, a)], width, height)[0], wrong)
    n = spec.count
    m = rng.choice([c for c in (n - 1, n + 1) if c <= max(COUNT_WORDS)])
    larger = _layout(replace(spec, count=max(n, m)), width, height, rng)
    smaller = larger[:]
    del smaller[rng.randrange(len(smaller))]
    scene, miss = (larger, smaller) if n > m else (smaller, larger)
    wrong = replace(spec, count=m) if m >= 2 else SceneSpec("single", spec.colour, spec.shape)
    pair = spec.pairs()[0]
    return (_draw_scene([(pair, box) for box in scene], width, height)[0],
            _draw_scene([(pair, box) for box in miss], width, height)[0], wrong)


# --------------------------------------------------------------------------- evaluation


def eval_prompts(
    holdout: Holdout, split: Literal["train", "heldout"], n_per_kind: int, seed: int
) -> list[SceneSpec]:
    """Fixed evaluation specs: n_per_kind singles, then counts, then relations.

    heldout: singles cycle through every held-out pair (all appear once n_per_kind >= 3),
    counts cycle through held-out pairs with seeded counts, relations cycle through the
    held-out triples in seeded order. train: seeded training specs of each kind.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    if split == "train":
        return [sample_spec(rng, holdout, "train", kind) for kind in KINDS for _ in range(n_per_kind)]

    pairs = sorted(holdout.pairs)
    triples = list(_heldout_triples(holdout))
    if n_per_kind and not (pairs and triples):
        raise ValueError("holdout has no held-out pairs or relation triples")
    rng.shuffle(triples)
    specs = [SceneSpec("single", *pairs[i % len(pairs)]) for i in range(n_per_kind)]
    specs += [SceneSpec("count", *pairs[i % len(pairs)], rng.randint(2, 4)) for i in range(n_per_kind)]
    specs += [_oriented(triples[i % len(triples)], rng) for i in range(n_per_kind)]
    return specs


# --------------------------------------------------------------------------- the data stage's records


def object_boxes(placed: list[PlacedObject], width: int, height: int) -> list[list[float]]:
    """Each object's bounding square as [x0, y0, x1, y1] in fractions of the image (SFT's curation reads these)."""
    boxes = []
    for obj in placed:
        half = obj.size / 2
        boxes.append([round((obj.cx - half) / width, 4), round((obj.cy - half) / height, 4),
                      round((obj.cx + half) / width, 4), round((obj.cy + half) / height, 4)])
    return boxes


@functools.lru_cache(maxsize=8)
def _holdout(seed: int) -> Holdout:
    return make_holdout(seed)


def render_record(resolution: int, seed: str, holdout_seed: int, ratios: list[str], multiple: int,
                  extra_colours: tuple[str, ...] = (), extra_shapes: tuple[str, ...] = ()
                  ) -> tuple[SceneSpec, str, Image.Image, list[list[float]]]:
    """One training scene (never a held-out composition) from its own seed, rendered natively in a random
    aspect-ratio bucket of the resolution stage: (spec, caption, image, object boxes). The same seed gives the same
    record in any process."""
    from data.buckets import buckets_for

    rng = random.Random(seed)
    spec = sample_spec(rng, _holdout(holdout_seed), "train", extra_colours=tuple(extra_colours),
                       extra_shapes=tuple(extra_shapes))
    text = caption(spec, rng)
    buckets = buckets_for(resolution, ratios, multiple)
    width, height = buckets[rng.randrange(len(buckets))]
    image, placed = render(spec, width, height, rng)
    return spec, text, image, object_boxes(placed, width, height)
