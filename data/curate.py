"""Curation: the funnel (data/funnel.py) over the configured sources (data/sources.py; none configured: the
synthetic source) into bucketed shards.

1. The mixed sources stream in chunks to worker processes (all cores), which read or render each record, run the
   quality operators, encode each survivor's bucket images, embed its caption and serialise its shard samples; the
   main process only drops duplicates in stream order and appends the survivors' ready bytes to the shards. A
   bounded window of chunks is in flight, so memory does not grow with the source. The serialised samples come
   back through a file per chunk, not the pool's pipe (see `_inspect_and_spill`).
2. Categories are rebalanced over the candidates (a list of short strings, not images).
   Without rebalancing or a scorer (below) survivors go straight to the final shards instead.
3. With a text-image scorer (e.g. the reward stage's model), each record's smallest bucket image is scored against
   its caption and records below data.funnel.min_alignment are dropped; without one the check is skipped, with a
   notice in the report.
4. The kept candidates are copied into the final shards.
With task captions a seeded share of the kept records (data.heldout_fraction, chosen by a hash of the seed and the
record's key, so the same records whatever else is kept) goes to shards of its own beside the training shards
(`heldout/`): the evaluation's images, which no stage trains on.
The result depends on the seed and the config only, not on the number of workers: chunks are the same for any
number of workers and the main process takes them in stream order.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from data.funnel import THUMB, Funnel, init_worker, inspect_chunk, png_bytes, rebalance
from data.shards import EncodedSample, ShardWriter, iter_samples
from data.sources import mixed_records, synthetic_records

NO_SCORER = "alignment: no text-image scorer configured (data.funnel.alignment_model): not checked"


def is_heldout(key: str, seed: int, fraction: float) -> bool:
    """Whether a record is in the held-out split: a hash of (seed, key) below `fraction` (stable, seeded)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_bounded_map(fn: Callable, tasks: Iterable, processes: int, initializer: Callable,
                         initargs: tuple) -> Iterator:
    """fn over tasks in order: in this process when processes == 1, else on a pool of processes, with at most 4
    tasks per process in flight (Pool.imap would read the whole source ahead); either way after
    initializer(*initargs) in the process that runs fn.

    Workers are forked where the platform can: they start in milliseconds and share this process's imported
    modules and text encoder copy-on-write, where spawned ones each spent ~6 s importing torch and transformers
    and loading the encoder (which cost more than the second core gained at 1000 samples). The workers use no GPU
    and one torch thread (as DataLoader's forked workers do), so what forking leaves unsafe does not arise."""
    if processes == 1:
        import torch

        threads = torch.get_num_threads()
        initializer(*initargs)  # one torch thread, as in the workers: a fair baseline (2 threads ran 14x slower)
        try:
            yield from map(fn, tasks)
        finally:
            torch.set_num_threads(threads)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(processes, _pool_worker_init, (initializer, initargs)) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 4 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()  # done: the workers exit on their own; `with` would terminate() them by SIGTERM instead
        pool.join()


def _pool_worker_init(initializer: Callable, initargs: tuple) -> None:
    """A pool worker's set-up: SIGTERM back to its default action, then initializer(*initargs). A forked worker
    inherits its parent's Python SIGTERM handler, and inside a Prefect flow that is Prefect's, which raises an
    exception instead of ending the process: a `kiln run --only data` hung for 10 minutes in Pool.terminate(),
    joining a worker that had outlived its SIGTERM."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    initializer(*initargs)


def _inspect_and_spill(args) -> list:
    """Worker entry point with more than one process: inspect_chunk, then the chunk's serialised samples (~54 KB
    per 256 px image: PNGs at 64 and 128 px and the caption embedding) go to a file and each sample in the result
    becomes (bucket, key, tensor fields, offset, length). Through the pool's pipe the main process received and
    unpickled every byte: 0.6 s of its 1 s of CPU time for 4000 images, taken from the workers' two cores."""
    spill_path, chunk = args
    items = inspect_chunk(chunk)
    offset = 0
    with open(spill_path, "wb") as file:
        for item in items:
            refs = []
            for sample in item.samples:
                file.write(sample.tar_bytes)
                refs.append((sample.bucket, sample.key, sample.tensor_fields, offset, len(sample.tar_bytes)))
                offset += len(sample.tar_bytes)
            item.samples = refs
    return [spill_path, items]


def _unspill(result) -> list:
    """Main process: the spilled chunk's samples back as EncodedSample views of one read of its file (then
    removed)."""
    spill_path, items = result
    data = memoryview(Path(spill_path).read_bytes())
    os.unlink(spill_path)
    for item in items:
        item.samples = [EncodedSample(bucket, key, fields, data[offset:offset + length])
                        for bucket, key, fields, offset, length in item.samples]
    return items


def curate(cfg, shard_dir: Path, embed: Callable, progress: bool = True, scorer: Callable | None = None) -> Funnel:
    """Run the funnel over cfg.data.sources (empty: the synthetic source) into shards at shard_dir.
    embed(captions) -> (emb (B, L, D), mask (B, L)) CPU tensors, called in the worker processes (forked: they
    inherit it; spawned, where there is no fork: it is pickled to each once).
    scorer(images: list[PIL.Image] of one size, captions) -> scores (higher: better aligned), or None.
    Returns the Funnel (its report() and example_grid())."""
    from kiln.config import SourceConfig

    dcfg, fcfg = cfg.data, cfg.data.funnel
    shard_dir = Path(shard_dir)
    resolutions = sorted({r.resolution for r in cfg.train.rungs})
    processes = fcfg.num_proc or os.cpu_count() or 1
    sources = dcfg.sources or [SourceConfig(kind="synthetic")]
    funnel = Funnel(fcfg)
    candidates_dir = shard_dir.parent / ".candidates"
    shutil.rmtree(candidates_dir, ignore_errors=True)
    decide_later = fcfg.rebalance_max_ratio is not None or scorer is not None
    # Of kept records, only when decisions come after the stream: key, category, and the key of its sample at the
    # smallest resolution stage it has (what the scorer judges).
    keys, categories, scored_samples = [], [], set()

    synthetic = functools.partial(synthetic_records, resolutions, dcfg.samples_per_resolution, cfg.seed,
                                  dcfg.holdout_seed, tuple(dcfg.extra_colours), tuple(dcfg.extra_shapes))
    records = mixed_records(sources, cfg.seed, funnel.source_failed, synthetic)
    source_cfgs = [src.funnel_config(fcfg) for src in sources]
    tasks = ((chunk, source_cfgs, resolutions, dcfg.aspect_ratios, dcfg.bucket_multiple)
             for chunk in _chunks(enumerate(records), fcfg.chunk_size))
    spill_dir = shard_dir.parent / ".spill"  # with more than one process: each chunk's samples, until written
    if processes == 1:
        inspected_chunks = _ordered_bounded_map(inspect_chunk, tasks, 1, init_worker, (embed,))
    else:
        shutil.rmtree(spill_dir, ignore_errors=True)
        spill_dir.mkdir(parents=True)
        spilled = ((str(spill_dir / f"chunk-{i:07d}.bin"), task) for i, task in enumerate(tasks))
        inspected_chunks = map(_unspill, _ordered_bounded_map(_inspect_and_spill, spilled, processes, init_worker,
                                                              (embed,)))
    fraction = dcfg.heldout_fraction if cfg.task_kind == "captions" else 0.0
    heldout_dir = shard_dir.parent / "heldout"
    shutil.rmtree(heldout_dir, ignore_errors=True)
    bar = tqdm(desc="curate", unit="img", disable=not progress)
    try:
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(ShardWriter(candidates_dir if decide_later else shard_dir,
                                                     max_samples_per_shard=dcfg.max_samples_per_shard))
            held_writer = stack.enter_context(ShardWriter(heldout_dir, max_samples_per_shard=dcfg.max_samples_per_shard)) \
                if fraction and not decide_later else None
            for inspected in inspected_chunks:
                for item in inspected:
                    if funnel.consider(item):
                        if decide_later:
                            keys.append(item.key)
                            categories.append(item.category)
                            scored_samples.add(item.samples[0].key)  # samples come in increasing resolution
                        target = held_writer if held_writer and is_heldout(item.key, cfg.seed, fraction) else writer
                        for sample in item.samples:
                            target.write_encoded(sample)
                bar.update(len(inspected))
                bar.set_postfix(kept=funnel.seen - sum(c.dropped for c in funnel.counts.values()))
            if funnel.seen == 0:
                raise ValueError(f"curate: the sources gave no records "
                                 f"({'; '.join(funnel.unreadable_sources) or 'empty'})")
    finally:
        bar.close()
        shutil.rmtree(spill_dir, ignore_errors=True)
    if scorer is None:
        funnel.notices.append(NO_SCORER)
    if not decide_later:
        return funnel

    dropped = set()
    if fcfg.rebalance_max_ratio is not None:
        for i in sorted(rebalance(categories, cfg.seed, fcfg.rebalance_max_ratio)):
            funnel.dropped_later("rebalance", keys[i], f"category {categories[i]} over its share")
            dropped.add(keys[i])
    if scorer is not None:
        dropped |= _misaligned(candidates_dir, scored_samples, dropped, scorer, fcfg.min_alignment, funnel)
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ShardWriter(shard_dir, max_samples_per_shard=dcfg.max_samples_per_shard))
        held_writer = stack.enter_context(ShardWriter(heldout_dir, max_samples_per_shard=dcfg.max_samples_per_shard)) \
            if fraction else None
        for s in iter_samples(candidates_dir, load_images="png"):
            key = s["meta"]["source_key"]
            if key not in dropped:
                target = held_writer if held_writer and is_heldout(key, cfg.seed, fraction) else writer
                target.write(bucket=s["bucket"], key=s["key"], caption=s["caption"], image=s.get("image_png"),
                             meta=s["meta"], tensors={name: s[name] for name in ("text_emb", "text_mask")})
    shutil.rmtree(candidates_dir, ignore_errors=True)
    return funnel


def _misaligned(candidates_dir: Path, scored_samples: set, dropped: set, scorer: Callable, threshold: float,
                funnel: Funnel) -> set:
    """Keys of records whose sample named in scored_samples (one per record) scores below threshold against its
    caption."""
    out = set()
    images = (s for s in iter_samples(candidates_dir, load_images=True)
              if s["key"] in scored_samples and s["meta"]["source_key"] not in dropped)
    for batch in _chunks(images, 64):
        by_bucket = collections.defaultdict(list)  # the scorer takes one image size at a time
        for sample in batch:
            by_bucket[sample["bucket"]].append(sample)
        for samples in by_bucket.values():
            scores = scorer([s["image"] for s in samples], [s["caption"] for s in samples])
            for sample, score in zip(samples, scores):
                if float(score) < threshold:
                    thumb = sample["image"].copy()
                    thumb.thumbnail((THUMB, THUMB))
                    funnel.dropped_later("alignment", sample["meta"]["source_key"],
                                         f"score {float(score):.3f} < {threshold}", png_bytes(thumb))
                    out.add(sample["meta"]["source_key"])
    return out
