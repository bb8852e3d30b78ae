"""Image-caption sources read through Hugging Face `datasets` (streaming): a local image folder with captions
(`imagefolder` + metadata.jsonl / csv / parquet), Parquet files, WebDataset tar shards (local paths, globs or any
fsspec URL) and hub datasets (only when a config names one); and the synthetic source, whose records are only a
scene's seed and resolution (the funnel's workers render them). Several sources mix with weights.

Each file (or the hub dataset, or the folder) is read on its own, so a corrupt one is reported and skipped while the
rest goes on. Records: {key, image_bytes or image_path or render, caption, category, source, source_index}.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

from kiln import seeding

BUILDERS = {"imagefolder": "imagefolder", "parquet": "parquet", "webdataset": "webdataset"}
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # the names imagefolder reads


class MissingColumn(ValueError):
    """A configured column the source does not have: a configuration error, never skipped like a corrupt file."""


def source_units(src) -> list[str]:
    """What is read as one unit: each file of a parquet / webdataset source (a glob or fsspec URL expands), the whole
    folder of an imagefolder source, the dataset id of a hub source."""
    if src.kind in ("imagefolder", "hub", "synthetic"):
        return [src.path]
    import fsspec

    if any(ch in src.path for ch in "*?["):
        fs, _, paths = fsspec.core.get_fs_token_paths(src.path)
        units = sorted(paths if "://" not in src.path else (fs.unstrip_protocol(p) for p in paths))
    elif "://" not in src.path and Path(src.path).is_dir():
        suffix = ".parquet" if src.kind == "parquet" else ".tar"
        units = sorted(str(p) for p in Path(src.path).rglob(f"*{suffix}"))
    else:
        units = [src.path]
    if not units:
        raise FileNotFoundError(f"data source {src.path}: no {src.kind} files there")
    return units


def _open(src, unit: str):
    from datasets import Image, load_dataset

    listings = _jsonl_listings(src, unit) if src.kind == "imagefolder" else []
    if listings:
        rows = _JsonlFolder(listings, src.image_column)
        if [c for c in (src.caption_column, src.category_column, src.quality_column) if c and c not in rows.columns]:
            _missing(src, unit, rows.columns)
        return rows  # images are paths already
    if src.kind == "hub":
        ds = load_dataset(unit, split=src.split, streaming=True)
    elif src.kind == "imagefolder":
        # One glob of the folder (or its split's subfolder): data_dir would try ~66 split patterns, each walking the
        # whole folder, in this process (1.5 s per 1000 files).
        folder = Path(unit) / src.split if "://" not in unit and (Path(unit) / src.split).is_dir() else Path(unit)
        ds = load_dataset("imagefolder", data_files={src.split: _imagefolder_patterns(folder, unit)}, split=src.split,
                          streaming=True)
    else:
        ds = load_dataset(BUILDERS[src.kind], data_files=[unit], split="train", streaming=True)
    columns = list(ds.features or {})
    needed = [c for c in (src.image_column, src.caption_column, src.category_column, src.quality_column) if c]
    missing = [c for c in needed if columns and c not in columns]
    if missing:
        _missing(src, unit, columns)
    if columns and src.image_column in columns:
        ds = ds.cast_column(src.image_column, Image(decode=False))  # bytes: decoding is the funnel's first check
    return ds


def _missing(src, unit: str, columns: list[str]):
    missing = [c for c in (src.image_column, src.caption_column, src.category_column, src.quality_column)
               if c and c not in columns]
    raise MissingColumn(f"data source {unit}: no column {', '.join(repr(c) for c in missing)} "
                        f"(columns: {', '.join(columns)}); set image_column / caption_column / category_column")


def _jsonl_listings(src, unit: str) -> list[Path]:
    """A local image folder's metadata.jsonl files, when they are its only metadata (read by `_JsonlFolder`)."""
    if "://" in unit:
        return []
    folder = Path(unit) / src.split if (Path(unit) / src.split).is_dir() else Path(unit)
    listings = sorted(folder.rglob("metadata.*"))
    return listings if listings and all(p.name == "metadata.jsonl" for p in listings) else []


class _JsonlFolder:
    """The rows of an image folder's metadata.jsonl files, each row's `file_name` made a path beside its listing
    (what the imagefolder builder does). Read a line at a time: the builder parses a listing as one Arrow table, so
    one caption that is a number, or one line that is not JSON, failed the whole folder; here that row alone becomes
    a record the funnel drops and names."""

    def __init__(self, listings: list[Path], image_column: str):
        self.listings, self.image_column = listings, image_column
        first = next((row for row in self if "error" not in row), {})
        self.columns = [key for key in first]  # the first good row's keys: what the column check reads

    def __iter__(self):
        import json

        for listing in self.listings:
            with listing.open(encoding="utf-8", errors="replace") as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError(f"a JSON {type(row).__name__}, not an object")
                    except ValueError as exc:
                        yield {self.image_column: {}, "error": f"{listing}:{number}: not a JSON object "
                                                               f"({str(exc)[:60]})"}
                        continue
                    name = row.pop("file_name", None)
                    path = str(listing.parent / name) if isinstance(name, str) and name else None
                    yield {self.image_column: {"path": path}, **row,
                           **({} if path else {"error": f"{listing}:{number}: no file_name"})}


def _imagefolder_patterns(folder: Path, unit: str) -> str | list[str]:
    """The files an image folder is opened with. With metadata files, only those: the builder takes its rows and
    each row's image path from them (datasets >= 5 checked; older builders walked the image files), so passing every
    image only made datasets resolve and stat each one in Python before the first record (1.2 s and ~4 KB of memory
    per file for 4000 files, in the main process while the curation workers waited). Without metadata (or remote):
    every file, which is needed for labels from folder names."""
    import datasets

    if "://" not in unit and int(datasets.__version__.split(".")[0]) >= 5:
        names = {p.name for p in folder.rglob("metadata.*")} & set(IMAGEFOLDER_METADATA)
        if names:
            return [f"{folder}/**/{name}" for name in sorted(names)]
    return f"{folder}/**"


def _image_fields(value) -> dict:
    """The image as stored: its bytes, or (files in a folder) its path, which the funnel's workers read."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"image_bytes": value["bytes"]}
        if value.get("path"):
            return {"image_path": value["path"]}
    if isinstance(value, bytes):
        return {"image_bytes": value}
    return {"image_bytes": b""}


def iter_unit(src, unit: str, tag: str) -> Iterator[dict]:
    """Records of one unit. Raises on a missing column (before the first record) or a broken file (mid-stream)."""
    for i, row in enumerate(_open(src, unit)):
        if src.image_column not in row:
            raise MissingColumn(f"data source {unit}: no column {src.image_column!r} (columns: {', '.join(row)})")
        yield {"key": f"{tag}-{i:07d}", **_image_fields(row[src.image_column]),
               "caption": row.get(src.caption_column), "source": unit,
               "category": str(row.get(src.category_column)) if src.category_column else None,
               **({"quality": row.get(src.quality_column)} if src.quality_column else {}),
               **({"error": row["error"]} if row.get("error") else {})}


def synthetic_records(resolutions: list[int], per_resolution: int, seed: int, holdout_seed: int,
                      extra_colours: tuple[str, ...] = (), extra_shapes: tuple[str, ...] = ()) -> Iterator[dict]:
    """per_resolution scenes for each resolution stage: a seed each, which the funnel's workers render natively at
    that resolution (data/funnel.py render_synthetic), so records are tiny and rendering runs on every core.
    extra_colours, extra_shapes: training-only colours and shapes (data.extra_colours, data.extra_shapes)."""
    extra = {**({"extra_colours": list(extra_colours)} if extra_colours else {}),
             **({"extra_shapes": list(extra_shapes)} if extra_shapes else {})}
    for resolution in resolutions:
        for i in range(per_resolution):
            yield {"key": f"r{resolution}-{i:07d}", "source": "synthetic",
                   "render": {"resolution": resolution, "seed": seeding.synthetic_scene(seed, resolution, i),
                              "holdout_seed": holdout_seed, **extra}}


def mixed_records(sources: list, seed: int, on_error: Callable[[str, BaseException], None],
                  synthetic: Callable[[], Iterator[dict]] | None = None) -> Iterator[dict]:
    """Records of all sources interleaved by weight (seeded: deterministic), each source's units one after the
    other; a synthetic source's records come from synthetic(). A unit that fails mid-stream is reported through
    on_error(unit, error) and skipped; a missing column is a configuration error and stops the run with its
    one-line message."""
    rng = random.Random(seed)

    def records_of(index: int, src):
        if src.kind == "synthetic":
            for record in synthetic():
                yield {**record, "key": f"s{index}-{record['key']}", "source_index": index}
            return
        for u, unit in enumerate(source_units(src)):
            try:
                for record in iter_unit(src, unit, f"s{index}u{u}"):
                    yield {**record, "source_index": index}
            except MissingColumn:
                raise
            except Exception as exc:  # noqa: BLE001 - a corrupt file or shard: count it, name it, go on
                on_error(unit, exc)

    streams = [records_of(i, src) for i, src in enumerate(sources)]
    weights = [src.weight for src in sources]
    live = list(range(len(streams)))
    while live:
        pick = rng.choices(live, weights=[weights[i] for i in live])[0]
        record = next(streams[pick], None)
        if record is None:
            live.remove(pick)
        else:
            yield record
