"""The curation funnel (Qwen-Image's data filtering, the working version): named operators with thresholds from the
config, run over a stream of raw records on all cores, with a report of what each one dropped.

Per record, in a worker process (`inspect_chunk`): decode (unreadable or truncated files, missing files, images
over data.funnel.max_pixels) into 8-bit RGB as a photo editor shows it (`to_rgb`: EXIF orientation, transparency over
data.funnel.background, CMYK, 16-bit and greyscale, the first frame of an animation), or, for the synthetic
source, render the scene from its seed; file size, resolution, aspect ratio, luma, saturation, entropy, clarity
(variance of the Laplacian), caption checks; then the image resized and centre-cropped to its aspect-ratio bucket
for every resolution stage it qualifies for (a synthetic scene is rendered at its own stage's bucket), the caption
embedded, and each shard sample serialised (data/shards.py encode_sample).
In the main process, in stream order (`Funnel.consider`): exact duplicates (hash of the decoded pixels) and near
duplicates (64-bit perceptual hash within a Hamming distance of any kept image). Category rebalancing happens once
the stream has been seen (`rebalance`). Records: see data/sources.py.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from data.buckets import buckets_for
from data.shards import encode_sample

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
    if caption is None or (isinstance(caption, str) and not caption.strip()):
        return "empty caption"
    if not isinstance(caption, str):
        return f"caption is not text ({type(caption).__name__})"
    words = len(caption.split())
    if words < cfg.caption_min_words:
        return f"{words} words < {cfg.caption_min_words}"
    if words > cfg.caption_max_words:
        return f"{words} words > {cfg.caption_max_words}"
    if "\ufffd" in caption:
        return "invalid characters"
    return None


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(opened: Image.Image, background: tuple[int, int, int]) -> tuple[Image.Image, list[str]]:
    """A decoded image as the 8-bit RGB a viewer shows, and the conversions that took (names for the report).

    Pillow decodes an animation's first frame unless told otherwise. Dropping alpha would turn the colours an encoder
    leaves under transparent pixels into content, so transparency is composited over `background`."""
    done = []
    if getattr(opened, "n_frames", 1) > 1:
        done.append("first frame of an animation")
    if opened.getexif().get(0x0112, 1) != 1:  # EXIF Orientation: the camera's rotation, applied as a viewer does
        opened = ImageOps.exif_transpose(opened)
        done.append("EXIF orientation")
    mode = opened.mode
    if mode in SIXTEEN_BIT_MODES:  # 16-bit grey: convert("L") would clip at 255, not rescale
        grey = np.asarray(opened, dtype=np.float64)  # (H, W) in 0..65535
        opened = Image.fromarray(np.clip(grey / 257.0 + 0.5, 0, 255).astype(np.uint8))
        done.append("16-bit")
        mode = "L"
    elif mode == "F":
        opened = Image.fromarray(np.clip(np.asarray(opened), 0, 255).astype(np.uint8))
        done.append("32-bit float")
        mode = "L"
    elif mode == "CMYK":  # Pillow's JPEG decoder already undoes Adobe's inverted CMYK
        done.append("CMYK")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in opened.info
    if has_alpha:
        rgba = opened.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            done.append("transparency composited")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB"), done
        return rgba.convert("RGB"), done
    if opened.mode in ("L", "1"):
        done.append("greyscale")
    return opened.convert("RGB"), done


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
    cause: str = ""  # the reason's kind, counted in the report (e.g. "missing file", "caption is not text")
    conversions: list = field(default_factory=list)  # what to_rgb converted (kept and dropped records alike)
    caption: str | None = None
    category: str | None = None
    pixel_hash: int = 0  # 64 bits of the sha256 of the decoded pixels
    phash: int = 0
    near_duplicate_bits: int = -1  # this record's source's threshold
    stats: dict = field(default_factory=dict)
    # Shard samples, one per resolution stage: (bucket, key, png bytes, meta) until the chunk's captions are
    # embedded, then EncodedSample.
    samples: list = field(default_factory=list)
    thumbnail: bytes | None = None  # dropped records only


def inspect_record(record: dict, index: int, cfg, resolutions: list[int], ratios: list[str], multiple: int) -> Inspected:
    """Run every stateless operator on one raw record (the first that fails drops it) and prepare its samples."""
    out = Inspected(key=str(record.get("key", index)), index=index, caption=record.get("caption"),
                    category=record.get("category"), near_duplicate_bits=cfg.near_duplicate_bits)

    def drop(operator: str, reason: str, image: Image.Image | None = None, cause: str | None = None) -> Inspected:
        out.dropped_by, out.reason, out.cause = operator, reason, cause or operator
        if image is not None:
            thumb = image.convert("RGB")
            thumb.thumbnail((THUMB, THUMB))
            out.thumbnail = png_bytes(thumb)
        return out

    rendered = record.get("render")
    data = None  # the file's bytes; a rendered scene has no file
    if rendered:
        from data.synthetic import render_record

        try:
            spec, out.caption, image, objects = render_record(rendered["resolution"], rendered["seed"],
                                                              rendered["holdout_seed"], ratios, multiple,
                                                              tuple(rendered.get("extra_colours", ())),
                                                              tuple(rendered.get("extra_shapes", ())))
        except Exception as exc:  # noqa: BLE001 - a scene the renderer cannot lay out is unusable, not fatal
            return drop("unreadable", f"render: {type(exc).__name__}: {str(exc)[:80]}")
        out.category = spec.kind
    else:
        data = record.get("image_bytes") or b""
        if not data and record.get("image_path"):  # a file of a folder source: read here, in the worker
            try:
                data = _read_file(record["image_path"])
            except FileNotFoundError:
                return drop("unreadable", f"no file {record['image_path']}", cause="missing file")
            except OSError as exc:
                return drop("unreadable", f"{type(exc).__name__}: {str(exc)[:80]}", cause="read error")
        if record.get("error"):  # the source could not make this row into a record (e.g. a metadata line not JSON)
            return drop("unreadable", record["error"], cause="bad metadata row")
        try:
            with Image.open(io.BytesIO(data)) as opened:
                pixels = opened.width * opened.height  # from the header: nothing decoded yet
                if pixels > cfg.max_pixels:
                    return drop("resolution", f"{opened.width}x{opened.height} = {pixels} px > max_pixels "
                                f"{cfg.max_pixels}", cause="too many pixels")
                opened.load()  # a truncated file fails here, not at open
                image, out.conversions = to_rgb(opened, tuple(cfg.background))
        except Image.DecompressionBombError as exc:  # over Pillow's own limit (2 x 89.5 Mpx), raised at open
            return drop("resolution", str(exc)[:120], cause="too many pixels")
        except Exception as exc:  # noqa: BLE001 - any decoder error means the file is unusable
            return drop("unreadable", f"{type(exc).__name__}: {str(exc)[:80]}", cause="decoder error")
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
        return drop("caption", problem, image, cause=problem if "words" not in problem else "caption length")
    out.pixel_hash = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:8], "little")
    out.phash = perceptual_hash(image)
    meta = {"kind": out.category, "source_key": out.key, **out.stats}
    if record.get("quality") is not None:  # a source's quality_column, for sft.select_by: quality
        try:
            meta["quality"] = float(record["quality"])
        except (TypeError, ValueError):
            pass  # not a number: the image has no quality score, so SFT never selects it
    if rendered:  # drawn for its resolution stage, in its bucket: no resizing, and the object boxes SFT reads
        resolution = rendered["resolution"]
        out.samples.append((image.size, out.key, png_bytes(image),
                            {**meta, "resolution": resolution, "objects": objects}))
        return out
    for resolution in resolutions:  # every resolution stage the image is large enough for
        if min(image.size) >= resolution * cfg.min_side_fraction:
            bucket = _nearest_bucket(image, buckets_for(resolution, ratios, multiple))
            out.samples.append((bucket, f"{out.key}-r{resolution}", png_bytes(fit_to_bucket(image, *bucket)),
                                {**meta, "resolution": resolution}))
    if not out.samples:
        return drop("resolution", f"{image.width}x{image.height}: too small for every resolution stage", image)
    return out


_embed = None  # this process's caption embedder: captions -> (emb (B, L, D), mask (B, L)); set by init_worker


def init_worker(embed) -> None:
    """Pool initializer (and the one-process path's setup): the caption embedder inspect_chunk uses, on one torch
    thread (one worker per core; on 2 cores torch's 2 threads made a batch of 32 captions take 40 ms, not 3)."""
    global _embed
    import torch

    torch.set_num_threads(1)
    _embed = embed


def inspect_chunk(args) -> list[Inspected]:
    """Worker entry point: (records [(index, record)], funnel config per source index, resolutions, ratios, bucket
    multiple) -> Inspected each, survivors with their shard samples serialised (captions embedded as one batch)."""
    records, cfgs, resolutions, ratios, multiple = args
    items = [inspect_record(record, index, cfgs[record.get("source_index", 0)], resolutions, ratios, multiple)
             for index, record in records]
    kept = [item for item in items if not item.dropped_by]
    if kept:
        emb, mask = _embed([item.caption for item in kept])  # (B, L, D), (B, L)
        for i, item in enumerate(kept):
            length = int(mask[i].sum())
            tensors = {"text_emb": emb[i, :length].half().cpu().numpy(), "text_mask": mask[i, :length].cpu().numpy()}
            item.samples = [encode_sample(bucket, key, item.caption, png, tensors, meta)
                            for bucket, key, png, meta in item.samples]
    return items


@dataclass
class OperatorCount:
    dropped: int = 0
    examples: list = field(default_factory=list)  # (key, reason, thumbnail png)
    causes: Counter = field(default_factory=Counter)  # drops by the kind of reason (Inspected.cause)


class Funnel:
    """The main process's side: duplicate checks in stream order, counts and examples for the report."""

    def __init__(self, cfg, examples_per_operator: int = 4):
        self.cfg, self.examples_per_operator = cfg, examples_per_operator
        self.seen = 0
        self.counts = {name: OperatorCount() for name in OPERATORS}
        self.unreadable_sources: list[str] = []  # whole files or shards that failed, with the error
        self.notices: list[str] = []  # operators that did not run, and why
        self.conversions: Counter = Counter()  # records whose decoded image needed a conversion, by conversion
        # The dedup index, what grows with the kept records: an int in a set (~70 bytes) and 8 bytes of perceptual
        # hash per kept record, in a buffer that doubles when full.
        self._pixel_hashes: set[int] = set()
        self._phashes = np.zeros(1024, dtype=np.uint64)
        self._n_phashes = 0

    def _drop(self, operator: str, item: Inspected, reason: str) -> None:
        count = self.counts[operator]
        count.dropped += 1
        count.causes[item.cause or operator] += 1
        if len(count.examples) < self.examples_per_operator:
            count.examples.append((item.key, reason, item.thumbnail))

    def consider(self, item: Inspected) -> bool:
        """True if the record is kept so far (rebalancing comes after the whole stream)."""
        self.seen += 1
        self.conversions.update(item.conversions)
        if item.dropped_by:
            self._drop(item.dropped_by, item, item.reason)
            return False
        if item.pixel_hash in self._pixel_hashes:
            self._drop("exact_duplicate", item, "same pixels as an earlier image")
            return False
        if item.near_duplicate_bits >= 0 and self._n_phashes:
            distance = np.bitwise_count(self._phashes[: self._n_phashes] ^ np.uint64(item.phash)).min()
            if distance <= item.near_duplicate_bits:
                self._drop("near_duplicate", item, f"perceptual hash {int(distance)} bits from an earlier image")
                return False
        self._pixel_hashes.add(item.pixel_hash)
        if self._n_phashes == len(self._phashes):
            self._phashes = np.concatenate([self._phashes, np.zeros_like(self._phashes)])
        self._phashes[self._n_phashes] = item.phash
        self._n_phashes += 1
        return True

    def dropped_later(self, operator: str, key: str, reason: str, thumbnail: bytes | None = None) -> None:
        """A drop decided after the stream (rebalancing, text-image alignment)."""
        count = self.counts[operator]
        count.dropped += 1
        count.causes[operator] += 1
        if len(count.examples) < self.examples_per_operator:
            count.examples.append((key, reason, thumbnail))

    def source_failed(self, name: str, error: BaseException) -> None:
        self.unreadable_sources.append(f"{name}: {type(error).__name__}: {str(error)[:120]}")

    def report(self) -> dict:
        remaining, rows = self.seen, []
        for name in OPERATORS:
            count = self.counts[name]
            rows.append({"operator": name, "saw": remaining, "dropped": count.dropped,
                         "causes": dict(sorted(count.causes.items())),
                         "examples": [f"{key} ({reason})" for key, reason, _ in count.examples]})
            remaining -= count.dropped
        return {"seen": self.seen, "kept": remaining, "operators": rows, "failed_sources": self.unreadable_sources,
                "conversions": dict(sorted(self.conversions.items())), "notices": self.notices}

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
