"""The curation funnel (Qwen-Image's data filtering, the working version): named operators with thresholds from the
config, run over a stream of raw records on all cores, with a report of what each one dropped.

Per record, in a worker process (`inspect_chunk`): decode (unreadable or truncated files), file size, resolution,
aspect ratio, luma, saturation, entropy, clarity (variance of the Laplacian), caption checks, then the image
resized and centre-cropped to its aspect-ratio bucket for every resolution stage it qualifies for, PNG-encoded.
In the main process, in stream order (`Funnel.consider`): exact duplicates (hash of the decoded pixels) and near
duplicates (64-bit perceptual hash within a Hamming distance of any kept image). Category rebalancing happens once
the stream has been seen (`rebalance`). Records are {key, image_bytes, caption, category}.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from data.buckets import buckets_for

OPERATORS = ("unreadable", "file_size", "resolution", "aspect_ratio", "luma", "saturation", "entropy", "clarity",
             "caption", "exact_duplicate", "near_duplicate", "rebalance", "alignment")
THUMB = 48  # px, the report's examples of dropped images


def luma(gray: np.ndarray) -> float:
    """Mean brightness in [0, 1]; gray: (H, W) float in [0, 1]."""
    return float(gray.mean())


def saturation(rgb: np.ndarray) -> float:
    """Mean HSV saturation in [0, 1]; rgb: (H, W, 3) uint8."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)  # uint8: cheap
    return float(((high - low) / np.maximum(high, 1).astype(np.float32)).mean())


def entropy(gray: np.ndarray) -> float:
    """Shannon entropy of the 256-bin grey histogram, in bits (0 for a flat image, 8 at most)."""
    counts = np.bincount((gray * 255).astype(np.uint8).ravel(), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def clarity(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image scaled to [0, 255]: low for blurred images."""
    g = gray * 255.0
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var()) if lap.size else 0.0


def perceptual_hash(image: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.phash(image)), 16)  # 64 bits: DCT of a 32x32 grey thumbnail


def caption_problem(caption, cfg) -> str | None:
    if not isinstance(caption, str) or not caption.strip():
        return "empty caption"
    words = len(caption.split())
    if words < cfg.caption_min_words:
        return f"{words} words < {cfg.caption_min_words}"
    if words > cfg.caption_max_words:
        return f"{words} words > {cfg.caption_max_words}"
    if "\ufffd" in caption:
        return "invalid characters"
    return None


def fit_to_bucket(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize so the bucket is covered, then centre-crop to it."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _nearest_bucket(image: Image.Image, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = image.width / image.height
    return min(buckets, key=lambda b: abs(math.log(ratio * b[1] / b[0])))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)  # fast: level 6 took most of a worker's time for 2x the size
    return out.getvalue()


def _read_file(path: str) -> bytes:
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    import fsspec

    with fsspec.open(path, "rb") as f:
        return f.read()


@dataclass
class Inspected:
    """What a worker found out about one record."""

    key: str
    index: int
    dropped_by: str | None = None
    reason: str = ""
    caption: str | None = None
    category: str | None = None
    pixel_hash: str = ""
    phash: int = 0
    stats: dict = field(default_factory=dict)
    buckets: dict = field(default_factory=dict)  # resolution -> ((width, height), png bytes)
    thumbnail: bytes | None = None  # dropped records only


def inspect_record(record: dict, index: int, cfg, resolutions: list[int], ratios: list[str], multiple: int) -> Inspected:
    """Run every stateless operator on one raw record (the first that fails drops it) and prepare its buckets."""
    out = Inspected(key=str(record.get("key", index)), index=index, caption=record.get("caption"),
                    category=record.get("category"))
    data = record.get("image_bytes") or b""
    if not data and record.get("image_path"):  # a file of a folder source: read here, in the worker
        try:
            data = _read_file(record["image_path"])
        except OSError as exc:
            out.dropped_by, out.reason = "unreadable", f"{type(exc).__name__}: {str(exc)[:80]}"
            return out

    def drop(operator: str, reason: str, image: Image.Image | None = None) -> Inspected:
        out.dropped_by, out.reason = operator, reason
        if image is not None:
            thumb = image.convert("RGB")
            thumb.thumbnail((THUMB, THUMB))
            out.thumbnail = png_bytes(thumb)
        return out

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # a truncated file fails here, not at open
            image = opened.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder error means the file is unusable
        return drop("unreadable", f"{type(exc).__name__}: {str(exc)[:80]}")
    if not cfg.min_file_bytes <= len(data) <= cfg.max_file_bytes:
        return drop("file_size", f"{len(data)} bytes", image)
    if min(image.size) < cfg.min_side:
        return drop("resolution", f"{image.width}x{image.height} < {cfg.min_side}", image)
    ratio = image.width / image.height
    if not 1 / cfg.max_aspect_ratio <= ratio <= cfg.max_aspect_ratio:
        return drop("aspect_ratio", f"{ratio:.2f}", image)
    rgb = np.asarray(image)  # (H, W, 3) uint8
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0  # (H, W), ITU-R 601 luma
    out.stats = {"luma": luma(gray), "saturation": saturation(rgb), "entropy": entropy(gray), "clarity": clarity(gray)}
    s = out.stats
    if not cfg.min_luma <= s["luma"] <= cfg.max_luma:
        return drop("luma", f"{s['luma']:.3f}", image)
    if s["saturation"] < cfg.min_saturation:
        return drop("saturation", f"{s['saturation']:.3f}", image)
    if s["entropy"] < cfg.min_entropy:
        return drop("entropy", f"{s['entropy']:.2f} bits", image)
    if s["clarity"] < cfg.min_clarity:
        return drop("clarity", f"{s['clarity']:.1f}", image)
    problem = caption_problem(out.caption, cfg)
    if problem:
        return drop("caption", problem, image)
    out.pixel_hash = hashlib.sha256(image.tobytes()).hexdigest()
    out.phash = perceptual_hash(image)
    for resolution in resolutions:  # every resolution stage the image is large enough for
        if min(image.size) >= resolution * cfg.min_side_fraction:
            bucket = _nearest_bucket(image, buckets_for(resolution, ratios, multiple))
            out.buckets[resolution] = (bucket, png_bytes(fit_to_bucket(image, *bucket)))
    if not out.buckets:
        return drop("resolution", f"{image.width}x{image.height}: too small for every resolution stage", image)
    return out


def inspect_chunk(args) -> list[Inspected]:
    """Worker entry point: (records [(index, record)], cfg, resolutions, ratios, multiple) -> Inspected each."""
    records, cfg, resolutions, ratios, multiple = args
    return [inspect_record(record, index, cfg, resolutions, ratios, multiple) for index, record in records]


@dataclass
class OperatorCount:
    dropped: int = 0
    examples: list = field(default_factory=list)  # (key, reason, thumbnail png)


class Funnel:
    """The main process's side: duplicate checks in stream order, counts and examples for the report."""

    def __init__(self, cfg, examples_per_operator: int = 4):
        self.cfg, self.examples_per_operator = cfg, examples_per_operator
        self.seen = 0
        self.counts = {name: OperatorCount() for name in OPERATORS}
        self.unreadable_sources: list[str] = []  # whole files or shards that failed, with the error
        self.notices: list[str] = []  # operators that did not run, and why
        self._pixel_hashes: set[str] = set()
        self._phashes = np.zeros(0, dtype=np.uint64)

    def _drop(self, operator: str, item: Inspected, reason: str) -> None:
        count = self.counts[operator]
        count.dropped += 1
        if len(count.examples) < self.examples_per_operator:
            count.examples.append((item.key, reason, item.thumbnail))

    def consider(self, item: Inspected) -> bool:
        """True if the record is kept so far (rebalancing comes after the whole stream)."""
        self.seen += 1
        if item.dropped_by:
            self._drop(item.dropped_by, item, item.reason)
            return False
        if item.pixel_hash in self._pixel_hashes:
            self._drop("exact_duplicate", item, "same pixels as an earlier image")
            return False
        if self.cfg.near_duplicate_bits >= 0 and len(self._phashes):
            distance = np.bitwise_count(self._phashes ^ np.uint64(item.phash)).min()
            if distance <= self.cfg.near_duplicate_bits:
                self._drop("near_duplicate", item, f"perceptual hash {int(distance)} bits from an earlier image")
                return False
        self._pixel_hashes.add(item.pixel_hash)
        self._phashes = np.append(self._phashes, np.uint64(item.phash))
        return True

    def dropped_later(self, operator: str, key: str, reason: str, thumbnail: bytes | None = None) -> None:
        """A drop decided after the stream (rebalancing, text-image alignment)."""
        count = self.counts[operator]
        count.dropped += 1
        if len(count.examples) < self.examples_per_operator:
            count.examples.append((key, reason, thumbnail))

    def source_failed(self, name: str, error: BaseException) -> None:
        self.unreadable_sources.append(f"{name}: {type(error).__name__}: {str(error)[:120]}")

    def report(self) -> dict:
        remaining, rows = self.seen, []
        for name in OPERATORS:
            count = self.counts[name]
            rows.append({"operator": name, "saw": remaining, "dropped": count.dropped,
                         "examples": [f"{key} ({reason})" for key, reason, _ in count.examples]})
            remaining -= count.dropped
        return {"seen": self.seen, "kept": remaining, "operators": rows, "failed_sources": self.unreadable_sources,
                "notices": self.notices}

    def example_grid(self) -> Image.Image | None:
        """One row of dropped-image thumbnails per operator that has any."""
        rows = [(name, [t for _, _, t in c.examples if t]) for name, c in self.counts.items()]
        rows = [(name, thumbs) for name, thumbs in rows if thumbs]
        if not rows:
            return None
        from PIL import ImageDraw

        label_w = 110
        grid = Image.new("RGB", (label_w + THUMB * self.examples_per_operator, THUMB * len(rows)), "white")
        draw = ImageDraw.Draw(grid)
        for r, (name, thumbs) in enumerate(rows):
            draw.text((4, r * THUMB + THUMB // 2 - 6), name, fill="black")
            for c, png in enumerate(thumbs):
                grid.paste(Image.open(io.BytesIO(png)), (label_w + c * THUMB, r * THUMB))
        return grid


def rebalance(categories: list[str | None], seed: int, max_share_ratio: float) -> set[int]:
    """Positions to drop so no category holds more than max_share_ratio x the smallest one's count (seeded, so
    deterministic). Records without a category are never dropped here."""
    counts = Counter(c for c in categories if c is not None)
    if len(counts) < 2:
        return set()
    cap = max(1, int(min(counts.values()) * max_share_ratio))
    rng = random.Random(seed)
    drop: set[int] = set()
    for category, count in sorted(counts.items()):
        if count > cap:
            positions = [i for i, c in enumerate(categories) if c == category]
            drop.update(rng.sample(positions, count - cap))
    return drop
