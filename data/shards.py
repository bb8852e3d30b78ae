"""Kiln's WebDataset shards: the one module that writes and reads them.

Layout of a shard folder::

    <dir>/manifest.json
    <dir>/<W>x<H>/shard-000000.tar, shard-000001.tar, ...

A bucket is an image size (W, H). Every shard holds samples of ONE bucket, so
every batch built from it has one image shape. Per sample, WebDataset naming
(``<key>.<field>``, the key holds no dots):

    caption.txt     utf-8 text
    meta.json       any JSON-able dict (e.g. the scene spec)
    image.png       optional, size == bucket
    <name>.npy      tensors, never pickled; floats stored as float16:
                    text_emb (L, D), text_mask (L,) bool, latents (C, h, w) optional

manifest.json::

    {"version": 1,
     "buckets": {"64x64": {"count": N, "shards": ["64x64/shard-000000.tar", ...]}},
     "count": total,
     "shards": {relpath: sha256 hex},
     "shard_counts": {relpath: samples in that shard},
     "content_hash": sha256 over the sorted shard hashes,
     "fields": [tensor names]}
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from kiln import seeding

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

Bucket = tuple[int, int]  # (width, height) in pixels

# WebDataset splits "<key>.<field>" on the first dot of the file name, so keys and
# tensor names must not contain dots (or slashes, which would make folders).
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
_RESERVED_FIELDS = {"caption", "image", "meta"}
# Fields whose first dimension is the text length L, which varies between samples:
# batches right-pad them with zeros (False for the mask).
_PADDED_FIELDS = {"text_emb", "text_mask"}


class ShardError(ValueError):
    """A shard on disk is corrupt, truncated or inconsistent with the manifest."""


def bucket_name(bucket: Bucket) -> str:
    """(64, 48) -> "64x48", the folder and manifest name of a bucket."""
    width, height = bucket
    return f"{width}x{height}"


def parse_bucket(name: str) -> Bucket:
    """ "64x48" -> (64, 48)."""
    match = re.fullmatch(r"(\d+)x(\d+)", name)
    if match is None:
        raise ValueError(f"bad bucket name {name!r}: expected '<W>x<H>'")
    return int(match.group(1)), int(match.group(2))


def _as_bucket(bucket) -> Bucket:
    """Accept (W, H), [W, H] (from JSON configs) or "WxH"."""
    if isinstance(bucket, str):
        return parse_bucket(bucket)
    width, height = (int(v) for v in bucket)
    if width <= 0 or height <= 0:
        raise ValueError(f"bad bucket {bucket!r}: width and height must be positive")
    return width, height


def _one_line(exn: BaseException) -> str:
    text = str(exn).strip().splitlines()
    return f"{type(exn).__name__}: {text[0] if text else ''}"


def content_hash(shard_hashes: Iterable[str]) -> str:
    """One hash for the whole dataset: independent of shard naming and write order of buckets."""
    return hashlib.sha256("\n".join(sorted(shard_hashes)).encode()).hexdigest()


# ----------------------------------------------------------------------------- writing


def _npy_bytes(name: str, value) -> bytes:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise ValueError(f"tensor {name!r} has dtype object; only numeric/bool arrays can be stored")
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float16:
        # the shard format stores floats as float16 (half the disk and read time)
        finite_before = np.isfinite(array)
        array = array.astype(np.float16)
        if not np.array_equal(np.isfinite(array), finite_before):
            raise ValueError(f"tensor {name!r} overflows float16")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _end_archive(file: io.BufferedWriter) -> bytes:
    """Two zero blocks, then zeros to a whole tar record, as tarfile ends an archive; closes the file and returns
    what it wrote."""
    end = file.tell() + 2 * tarfile.BLOCKSIZE
    tail = b"\0" * (end + -end % tarfile.RECORDSIZE - file.tell())
    file.write(tail)
    file.close()
    return tail


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedSample:
    """One sample serialised as its tar members (headers and padded data), ready to be appended to a shard: what
    curation's worker processes hand to the one writer, so the writing process only copies bytes."""

    bucket: Bucket
    key: str
    tensor_fields: tuple[str, ...]
    tar_bytes: bytes | memoryview  # a view into a chunk curation spilled to disk


def _tar_member(name: str, data: bytes) -> bytes:
    """A ustar member as tarfile writes it: fixed mtime and owner, so equal samples give equal bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "kiln", "kiln"
    padding = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * padding


def encode_sample(
    bucket: Bucket,
    key: str,
    caption: str,
    image: Image.Image | bytes | None = None,
    tensors: dict[str, np.ndarray | torch.Tensor] | None = None,
    meta: dict | None = None,
) -> EncodedSample:
    """Check and serialise one sample (see ShardWriter.write); runs anywhere, e.g. in a worker process."""
    bucket = _as_bucket(bucket)
    if not isinstance(key, str) or not _NAME_PATTERN.match(key):
        raise ValueError(f"bad sample key {key!r}: use letters, digits, '_' and '-' only (no dots)")
    tensors = tensors or {}
    members = {
        "caption.txt": caption.encode("utf-8"),
        "meta.json": json.dumps(meta or {}, sort_keys=True).encode("utf-8"),
    }
    if image is not None:  # a PIL image, or one already PNG-encoded (curation encodes in its workers)
        size = Image.open(io.BytesIO(image)).size if isinstance(image, bytes) else image.size
        if tuple(size) != bucket:
            raise ValueError(f"sample {key!r}: image size {size} does not match bucket {bucket}")
        members["image.png"] = image if isinstance(image, bytes) else _png_bytes(image)
    for name, value in tensors.items():
        if name in _RESERVED_FIELDS or not _NAME_PATTERN.match(name):
            raise ValueError(f"sample {key!r}: bad tensor name {name!r}")
        members[f"{name}.npy"] = _npy_bytes(name, value)
    data = b"".join(_tar_member(f"{key}.{field}", value) for field, value in members.items())
    return EncodedSample(bucket, key, tuple(tensors), data)


@dataclass
class _OpenShard:
    file: io.BufferedWriter
    tmp_path: Path
    final_path: Path
    relpath: str
    count: int = 0
    # The shard's sha256, fed as its bytes are written: reading each finished shard back to hash it cost the writing
    # process a second pass over everything (at the end of a run, with every worker already done).
    digest: object = field(default_factory=hashlib.sha256)


class ShardWriter:
    """Writes samples into per-bucket shards and, on close(), the manifest.

    Shards are written under a temporary name and renamed when complete, and the
    manifest is written last (atomically), so a crash never leaves something that
    looks like a finished dataset. Leaving the `with` block by an exception writes
    no manifest and removes the unfinished shards.
    """

    def __init__(self, out_dir: str | os.PathLike, max_samples_per_shard: int = 1000):
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.max_samples_per_shard = int(max_samples_per_shard)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # An old manifest would describe shards we are about to overwrite.
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        self._open: dict[Bucket, _OpenShard] = {}
        self._finished: dict[Bucket, list[tuple[str, int, str]]] = {}  # (relpath, count, sha256)
        self._keys: set[str] = set()  # grows by one short string per sample: the duplicate-key check
        self._fields: set[str] = set()
        self._closed = False
        self._manifest: dict | None = None  # set by close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(
        self,
        bucket: Bucket,
        key: str,
        caption: str,
        image: Image.Image | bytes | None = None,
        tensors: dict[str, np.ndarray | torch.Tensor] | None = None,
        meta: dict | None = None,
    ) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        self.write_encoded(encode_sample(bucket, key, caption, image, tensors, meta))

    def write_encoded(self, sample: EncodedSample) -> None:
        """Append a sample serialised by encode_sample (everything was checked there, so nothing is half-written)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if sample.key in self._keys:
            raise ValueError(f"duplicate sample key {sample.key!r}")
        shard = self._open.get(sample.bucket) or self._start_shard(sample.bucket)
        shard.file.write(sample.tar_bytes)
        shard.digest.update(sample.tar_bytes)
        shard.count += 1
        self._keys.add(sample.key)
        self._fields.update(sample.tensor_fields)
        if shard.count >= self.max_samples_per_shard:
            self._finish_shard(sample.bucket)

    def _start_shard(self, bucket: Bucket) -> _OpenShard:
        index = len(self._finished.get(bucket, []))
        relpath = f"{bucket_name(bucket)}/shard-{index:06d}.tar"
        final_path = self.out_dir / relpath
        final_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = final_path.with_name(final_path.name + ".tmp")
        shard = self._open[bucket] = _OpenShard(open(tmp_path, "wb"), tmp_path, final_path, relpath)
        return shard

    def _finish_shard(self, bucket: Bucket) -> None:
        shard = self._open.pop(bucket)
        shard.digest.update(_end_archive(shard.file))
        os.replace(shard.tmp_path, shard.final_path)
        sha = shard.digest.hexdigest()
        self._finished.setdefault(bucket, []).append((shard.relpath, shard.count, sha))

    def close(self) -> dict:
        """Finish all shards and write manifest.json; returns the manifest."""
        if self._closed:
            return self._manifest
        for bucket in list(self._open):
            self._finish_shard(bucket)
        self._closed = True

        buckets, shard_hashes, shard_counts = {}, {}, {}
        for bucket in sorted(self._finished):
            shards = self._finished[bucket]
            buckets[bucket_name(bucket)] = {
                "count": sum(count for _, count, _ in shards),
                "shards": [relpath for relpath, _, _ in shards],
            }
            for relpath, count, sha in shards:
                shard_hashes[relpath] = sha
                shard_counts[relpath] = count
        manifest = {
            "version": MANIFEST_VERSION,
            "buckets": buckets,
            "count": sum(entry["count"] for entry in buckets.values()),
            "shards": shard_hashes,
            "shard_counts": shard_counts,
            "content_hash": content_hash(shard_hashes.values()),
            "fields": sorted(self._fields),
        }
        path = self.out_dir / MANIFEST_NAME
        tmp_path = path.with_name(MANIFEST_NAME + ".tmp")
        tmp_path.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp_path, path)
        self._manifest = manifest
        return manifest

    def abort(self) -> None:
        """Drop unfinished shards and write no manifest (used when the with-block raises)."""
        for shard in self._open.values():
            try:
                shard.file.close()
            finally:
                shard.tmp_path.unlink(missing_ok=True)
        self._open.clear()
        self._closed = True


# ----------------------------------------------------------------------------- manifest


def _read_manifest_unchecked(shard_dir: str | os.PathLike) -> dict:
    """Parse manifest.json with one-line errors, allowing an empty dataset."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}: run the data stage first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        int(manifest["count"])
        for name, entry in manifest["buckets"].items():
            parse_bucket(name)
            int(entry["count"])
            for relpath in entry["shards"]:
                manifest["shards"][relpath]  # every listed shard has a hash
        manifest.setdefault("fields", [])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exn:
        raise ValueError(f"invalid shard manifest {path}: {_one_line(exn)}") from exn
    return manifest


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    """Parse <shard_dir>/manifest.json; one-line errors when missing, invalid or empty."""
    manifest = _read_manifest_unchecked(shard_dir)
    if int(manifest["count"]) == 0:
        path = Path(shard_dir) / MANIFEST_NAME
        raise ValueError(f"shard manifest {path} is empty (0 samples): run the data stage first")
    return manifest


@dataclass(frozen=True)
class _ShardInfo:
    bucket: Bucket
    relpath: str
    path: str  # <shard_dir>/<relpath>, also the WebDataset url
    count: int  # samples in the shard per the manifest; -1 if the manifest does not say


def _shard_table(shard_dir, manifest: dict, buckets=None) -> list[_ShardInfo]:
    """Shards of the selected buckets in a fixed order: bucket (W, H) ascending, then shard index."""
    available = {parse_bucket(name): entry for name, entry in manifest["buckets"].items()}
    if buckets is None:
        selected = sorted(available)
    else:
        selected = sorted({_as_bucket(b) for b in buckets})
        unknown = [b for b in selected if b not in available]
        if unknown:
            names = ", ".join(bucket_name(b) for b in sorted(available))
            raise ValueError(f"bucket(s) {', '.join(map(bucket_name, unknown))} not in {shard_dir}; available: {names}")
    counts = manifest.get("shard_counts", {})
    table = []
    for bucket in selected:
        for relpath in available[bucket]["shards"]:
            path = Path(shard_dir) / relpath
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing: rerun the data stage")
            table.append(_ShardInfo(bucket, relpath, str(path), int(counts.get(relpath, -1))))
    return table


# ----------------------------------------------------------------------------- reading


def _error_naming_the_shard(urls: Iterable[str]):
    """WebDataset exception handler that re-raises as a ShardError naming the shard.

    WebDataset appends the shard url to exn.args at the shard level; errors raised
    inside a tar arrive first without it, so those are re-raised unchanged and come
    back with the url attached.
    """
    known = set(urls)

    def handler(exn: Exception) -> bool:
        if isinstance(exn, ShardError):
            raise exn
        url = next((arg for arg in exn.args if isinstance(arg, str) and arg in known), None)
        if url is None:
            raise exn
        for arg in exn.args:  # the failed shard's open file; the traceback would keep it open
            if isinstance(arg, io.IOBase):
                arg.close()
        message = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
        raise ShardError(f"corrupt shard {url}: {type(exn).__name__}: {message}") from exn

    return handler


def _field_selector(tensor_fields: Iterable[str], load_images: bool, load_meta: bool):
    """select_files predicate so unrequested files (e.g. PNGs) are never even read into memory."""
    wanted = {"caption.txt"} | {f"{name}.npy" for name in tensor_fields}
    if load_images:
        wanted.add("image.png")
    if load_meta:
        wanted.add("meta.json")

    def select(fname: str) -> bool:
        return os.path.basename(fname).split(".", 1)[-1] in wanted

    return select


def _decode(raw: dict, shard: _ShardInfo, load_images: bool) -> dict:
    """Raw WebDataset sample (bytes per file) -> Kiln sample dict."""
    key = raw["__key__"]
    try:
        sample = {"key": key, "bucket": shard.bucket, "caption": raw["caption.txt"].decode("utf-8")}
        sample["meta"] = json.loads(raw["meta.json"]) if "meta.json" in raw else {}
        if load_images == "png" and "image.png" in raw:
            sample["image_png"] = raw["image.png"]  # as stored, not decoded
        elif load_images and "image.png" in raw:
            image = Image.open(io.BytesIO(raw["image.png"]))
            image.load()  # decode now, so a broken PNG fails here, naming its shard
            sample["image"] = image
        for fname, data in raw.items():
            if fname.endswith(".npy"):
                sample[fname[: -len(".npy")]] = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    except Exception as exn:
        raise ShardError(f"corrupt sample {key!r} in shard {shard.path}: {_one_line(exn)}") from exn
    return sample


def _check_count(shard: _ShardInfo, seen: int) -> None:
    if shard.count >= 0 and seen != shard.count:
        raise ShardError(
            f"corrupt shard {shard.path}: read {seen} samples, manifest says {shard.count} "
            "(truncated? rerun the data stage)"
        )


def _open_and_close(sources: Iterator[dict]) -> Iterator[dict]:
    """WebDataset opener stage for local shard files: {"url"} -> {"url", "stream"}."""
    for source in sources:
        url = source["url"] if isinstance(source, dict) else source
        with open(url, "rb") as stream:
            yield dict(url=url, stream=stream, local_path=url)


def _read(shards: list[_ShardInfo], split: bool, select_files, load_images: bool) -> Iterator[dict]:
    """Decoded samples of `shards` in order; with split=True only this node's/worker's share."""
    by_url = {shard.path: shard for shard in shards}
    dataset = wds.WebDataset(
        [shard.path for shard in shards],
        shardshuffle=False,  # order is fixed here; BucketBatches shuffles deterministically itself
        nodesplitter=wds.split_by_node if split else None,
        workersplitter=wds.split_by_worker if split else None,
        handler=_error_naming_the_shard(by_url),
        select_files=select_files,
        empty_check=False,  # a worker may legitimately get no shard
    )
    # WebDataset's StreamingOpen never closes the shard files it opens; swap in an
    # opener that closes each one once its samples are consumed (or iteration stops).
    dataset.pipeline = [
        _open_and_close if isinstance(stage, wds.cache.StreamingOpen) else stage for stage in dataset.pipeline
    ]
    current, seen = None, 0
    for raw in dataset:
        shard = by_url[raw["__url__"]]
        if shard is not current:
            if current is not None:
                _check_count(current, seen)
            current, seen = shard, 0
        seen += 1
        yield _decode(raw, shard, load_images)
    if current is not None:
        _check_count(current, seen)


def iter_samples(
    shard_dir: str | os.PathLike, buckets: Iterable[Bucket] | None = None, load_images: bool | str = True
) -> Iterator[dict]:
    """All samples in a fixed order (bucket, shard, position in shard).

    Each sample: key, caption, bucket (W, H), meta (dict), image (PIL, if stored and
    load_images; with load_images="png" image_png, the stored PNG bytes), and every
    stored tensor as a torch tensor in its stored dtype.
    Under torch.distributed / DataLoader workers each process gets a disjoint set of
    whole shards (split by node, then by worker).
    """
    # not a generator itself, so a missing/empty manifest fails at the call, not at first next()
    manifest = read_manifest(shard_dir)
    shards = _shard_table(shard_dir, manifest, buckets)
    select = None if load_images else (lambda fname: not fname.endswith(".png"))
    return _read(shards, split=True, select_files=select, load_images=load_images)


def _read_shard(shard: _ShardInfo, fields, load_images: bool, load_meta: bool) -> list[dict]:
    """One whole shard, samples in stored order, only the requested fields decoded."""
    select = _field_selector(fields, load_images, load_meta)
    samples = list(_read([shard], split=False, select_files=select, load_images=load_images))
    if not samples:
        _check_count(shard, 0)
    for sample in samples:
        for name in fields:
            if name not in sample:
                raise ShardError(f"sample {sample['key']!r} in shard {shard.path} has no {name}.npy")
    return samples


# ----------------------------------------------------------------------------- batching


def pad_and_stack(values: list[torch.Tensor]) -> torch.Tensor:
    """[(L_i, ...)] -> (B, max L_i, ...), right-padded with zeros / False."""
    longest = max(v.shape[0] for v in values)
    out = values[0].new_zeros((len(values), longest, *values[0].shape[1:]))
    for i, value in enumerate(values):
        out[i, : value.shape[0]] = value
    return out


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BucketBatches:
    """Bucket-homogeneous batches in a deterministic, exactly resumable order.

    Epoch plan, decided from the manifest's shard counts alone (so resuming needs no
    reading): shards are shuffled with random.Random(kiln.seeding.shard_shuffle(seed, epoch)), then each
    shard's samples are shuffled with the same generator, and batches are cut per
    bucket in that order; a bucket's leftover samples carry over to its next shard.
    Every epoch has the same number of batches (len(self)).

    Batch dict: latents (B, C, h, w) float32, text_emb (B, L, D) float32 right-padded
    with zeros to the longest L, text_mask (B, L) bool (False on padding), caption
    list[str], key list[str], bucket (W, H); plus meta list[dict] if "meta" is in
    fields and image list[PIL.Image] if load_images.

    position() is the next batch to yield; pass it back as start= to continue the
    exact sequence. batch_size is the global batch: under torch.distributed (or with
    rank/world_size given) rank r yields rows [r * b, (r + 1) * b) of every global batch,
    b = batch_size / world_size, and decodes only the shards those rows come from. The
    order, and so position(), does not depend on world_size: a checkpoint written by N
    processes continues exactly in one.
    Iterate it in the main process (not inside DataLoader workers).
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        batch_size: int,
        seed: int,
        buckets: Iterable[Bucket] | None = None,
        fields: Iterable[str] = ("latents", "text_emb", "text_mask"),
        drop_last: bool = True,
        load_images: bool = False,
        start: dict | None = None,
        cache_in_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shard_dir = Path(shard_dir)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.load_images = load_images
        self.cache_in_memory = cache_in_memory
        fields = tuple(fields)
        self.load_meta = "meta" in fields
        self.fields = tuple(f for f in fields if f != "meta")  # tensor fields

        manifest = read_manifest(shard_dir)
        missing = [f for f in self.fields if f not in manifest["fields"]]
        if missing:
            raise ValueError(
                f"shards at {shard_dir} have no field(s) {', '.join(missing)} "
                f"(stored: {', '.join(manifest['fields']) or 'none'})"
            )
        self._shards = _shard_table(shard_dir, manifest, buckets)
        if any(shard.count < 0 for shard in self._shards):
            raise ValueError(f"invalid shard manifest {self.shard_dir / MANIFEST_NAME}: no shard_counts")

        default_rank, default_size = _distributed_rank_and_size()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_size if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")
        if self.batch_size % self.world_size or (self.world_size > 1 and not drop_last):
            raise ValueError(f"global batch_size {self.batch_size} must split evenly over {self.world_size} processes "
                             f"(and drop_last=True)")
        self.rows = slice(self.rank * self.batch_size // self.world_size,
                          (self.rank + 1) * self.batch_size // self.world_size)  # this rank's rows of each batch

        per_bucket: dict[Bucket, int] = {}
        for shard in self._shards:
            per_bucket[shard.bucket] = per_bucket.get(shard.bucket, 0) + shard.count
        rounding = (lambda n: n // self.batch_size) if drop_last else (lambda n: -(-n // self.batch_size))
        self._batches_per_epoch = sum(rounding(n) for n in per_bucket.values())
        if len(self) == 0:
            raise ValueError(
                f"no batches: {sum(per_bucket.values())} samples in buckets "
                f"{', '.join(bucket_name(b) for b in per_bucket)} at batch_size {self.batch_size} "
                f"(drop_last={drop_last})"
            )

        self._cache: dict[str, list[dict]] = {}  # relpath -> decoded samples, if cache_in_memory
        self._epoch, self._batch = 0, 0
        if start is not None:
            self._seek(int(start["epoch"]), int(start["batch"]))

    def __len__(self) -> int:
        """(Global) batches per epoch."""
        return self._batches_per_epoch

    def position(self) -> dict:
        """The next batch to yield: {"epoch": e, "batch": b}."""
        return {"epoch": self._epoch, "batch": self._batch}

    def set_epoch(self, epoch: int) -> None:
        self._seek(int(epoch), 0)

    def _seek(self, epoch: int, batch: int) -> None:
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"bad position epoch={epoch} batch={batch}: epochs have {len(self)} batches")
        # "after the last batch of epoch e" is the same place as "start of epoch e + 1"
        self._epoch, self._batch = (epoch + 1, 0) if batch == len(self) else (epoch, batch)

    def _plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's rows of every batch of `epoch`, each a list of (shard index, sample index in shard)."""
        rng = random.Random(seeding.shard_shuffle(self.seed, epoch))
        shard_order = list(range(len(self._shards)))
        rng.shuffle(shard_order)
        pending: dict[Bucket, list[tuple[int, int]]] = {}
        batches = []
        for shard_index in shard_order:
            shard = self._shards[shard_index]
            order = list(range(shard.count))
            rng.shuffle(order)
            queue = pending.setdefault(shard.bucket, [])
            queue.extend((shard_index, i) for i in order)
            while len(queue) >= self.batch_size:
                batches.append(queue[: self.batch_size])
                del queue[: self.batch_size]
        if not self.drop_last:
            batches.extend(queue for _, queue in sorted(pending.items()) if queue)
        return [batch[self.rows] for batch in batches]

    def preload(self) -> int:
        """With cache_in_memory, decode every shard now rather than during the first epoch (keeps decoding out of
        the training loop). Returns the number of samples held."""
        if not self.cache_in_memory:
            raise ValueError("preload() needs cache_in_memory=True")
        return sum(len(self._load(i)) for i in range(len(self._shards)))

    def _load(self, shard_index: int) -> list[dict]:
        shard = self._shards[shard_index]
        if shard.relpath in self._cache:
            return self._cache[shard.relpath]
        samples = _read_shard(shard, self.fields, self.load_images, self.load_meta)
        if self.cache_in_memory:
            self._cache[shard.relpath] = samples
        return samples

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch, from position(); afterwards position() is (epoch + 1, 0)."""
        epoch, first = self._epoch, self._batch
        plan = self._plan(epoch)
        # How many of the remaining batches still need each shard, so a shard's decoded
        # samples are dropped as soon as its last batch is out.
        uses: dict[int, int] = {}
        for batch in plan[first:]:
            for shard_index in {s for s, _ in batch}:
                uses[shard_index] = uses.get(shard_index, 0) + 1
        loaded: dict[int, list[dict]] = {}
        for batch_index in range(first, len(plan)):
            refs = plan[batch_index]
            samples = []
            for shard_index, sample_index in refs:
                if shard_index not in loaded:
                    loaded[shard_index] = self._load(shard_index)
                samples.append(loaded[shard_index][sample_index])
            for shard_index in {s for s, _ in refs}:
                uses[shard_index] -= 1
                if uses[shard_index] == 0:
                    del loaded[shard_index]
            collated = self._collate(samples, self._shards[refs[0][0]].bucket)
            self._seek(epoch, batch_index + 1)
            yield collated

    def batches_forever(self) -> Iterator[dict]:
        """Epochs 0, 1, 2, ... (from position()) without end, keeping position() current."""
        while True:
            yield from self

    def _collate(self, samples: list[dict], bucket: Bucket) -> dict:
        batch = {
            "key": [s["key"] for s in samples],
            "caption": [s["caption"] for s in samples],
            "bucket": bucket,
        }
        for name in self.fields:
            values = [s[name] for s in samples]
            stacked = pad_and_stack(values) if name in _PADDED_FIELDS else torch.stack(values)
            if name.endswith("_mask"):
                stacked = stacked.bool()
            elif stacked.is_floating_point():
                stacked = stacked.float()
            batch[name] = stacked
        if self.load_meta:
            batch["meta"] = [s.get("meta", {}) for s in samples]
        if self.load_images:
            batch["image"] = [s.get("image") for s in samples]
        return batch


def split_hash(stage_dir: Path) -> str:
    """A data or latents stage's content: its training shards' hash, combined with the held-out shards' when it has
    them (task captions), each as its manifest records it."""

    stage_dir = Path(stage_dir)
    held = stage_dir / "heldout" / "manifest.json"
    return combined_hash(read_manifest(stage_dir / "shards")["content_hash"],
                         read_manifest(stage_dir / "heldout")["content_hash"] if held.exists() else None)


def combined_hash(train: str, heldout: str | None) -> str:
    """One content hash for training shards and held-out shards; without held-out ones (the synthetic task's
    stages) the training shards' hash, the hash they always had."""
    import hashlib

    return train if heldout is None else hashlib.sha256(f"{train}:{heldout}".encode()).hexdigest()
