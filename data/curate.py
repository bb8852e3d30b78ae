"""Curation: the funnel (data/funnel.py) over the configured sources (data/sources.py) into bucketed shards.

1. The mixed sources stream in chunks to worker processes (all cores), which decode, run the quality operators and
   encode each survivor's bucket images; the main process drops duplicates in stream order and writes survivors as
   candidate shards. A bounded window of chunks is in flight, so memory does not grow with the source.
2. Categories are rebalanced over the candidates (a list of short strings, not images).
   Without rebalancing or a scorer (below) survivors go straight to the final shards instead.
3. With a text-image scorer (e.g. the reward stage's model), each record's smallest bucket image is scored against
   its caption and records below data.funnel.min_alignment are dropped; without one the check is skipped, with a
   notice in the report.
4. The kept candidates are copied into the final shards (their PNG bytes as they are) with caption embeddings.
The result depends on the seed and the config only, not on the number of workers.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from data.funnel import THUMB, Funnel, inspect_chunk, png_bytes, rebalance
from data.shards import ShardWriter, iter_samples
from data.sources import mixed_records

EMBED_BATCH = 256


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_bounded_map(fn: Callable, tasks: Iterable, processes: int) -> Iterator:
    """fn over tasks in order: in this process when processes == 1, else on a pool with at most 2 tasks per process
    in flight (Pool.imap would read the whole source ahead)."""
    if processes == 1:
        yield from map(fn, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def curate(cfg, shard_dir: Path, embed: Callable, progress: bool = True, scorer: Callable | None = None) -> Funnel:
    """Run the funnel over cfg.data.sources into shards at shard_dir. embed(captions) -> (emb (B, L, D), mask (B, L))
    tensors; scorer(images: list[PIL.Image] of one size, captions) -> scores (higher: better aligned), or None.
    Returns the Funnel (its report() and example_grid())."""
    dcfg, fcfg = cfg.data, cfg.data.funnel
    shard_dir = Path(shard_dir)
    resolutions = sorted({r.resolution for r in cfg.train.rungs})
    processes = fcfg.num_proc or os.cpu_count() or 1
    funnel = Funnel(fcfg)
    candidates_dir = shard_dir.parent / ".candidates"
    shutil.rmtree(candidates_dir, ignore_errors=True)
    keys, categories = [], []

    records = mixed_records(dcfg.sources, cfg.seed, funnel.source_failed)
    tasks = ((chunk, fcfg, resolutions, dcfg.aspect_ratios, dcfg.bucket_multiple)
             for chunk in _chunks(enumerate(records), fcfg.chunk_size))
    bar = tqdm(desc="curate", unit="img", disable=not progress)

    def survivors() -> Iterator[dict]:
        """Each kept record's bucket images as shard samples, in stream order."""
        for inspected in _ordered_bounded_map(inspect_chunk, tasks, processes):
            for item in inspected:
                if funnel.consider(item):
                    keys.append(item.key)
                    categories.append(item.category)
                    for resolution, (bucket, png) in item.buckets.items():
                        yield {"bucket": bucket, "key": f"{item.key}-r{resolution}", "caption": item.caption,
                               "image_png": png, "meta": {"kind": item.category, "resolution": resolution,
                                                          "source_key": item.key, **item.stats}}
            bar.update(len(inspected))
            bar.set_postfix(kept=len(keys))
        if funnel.seen == 0:
            raise ValueError(f"curate: the sources gave no records "
                             f"({'; '.join(funnel.unreadable_sources) or 'empty'})")

    def write(samples: Iterable[dict]) -> None:
        """Samples with their caption embeddings into the final shards."""
        with ShardWriter(shard_dir, max_samples_per_shard=dcfg.max_samples_per_shard) as writer:
            for batch in _chunks(samples, EMBED_BATCH):
                emb, mask = embed([s["caption"] for s in batch])  # (B, L, D), (B, L)
                for i, sample in enumerate(batch):
                    length = int(mask[i].sum())
                    writer.write(bucket=sample["bucket"], key=sample["key"], caption=sample["caption"],
                                 image=sample["image_png"], meta=sample["meta"],
                                 tensors={"text_emb": emb[i, :length].half().cpu().numpy(),
                                          "text_mask": mask[i, :length].cpu().numpy()})

    if fcfg.rebalance_max_ratio is None and scorer is None:  # nothing decided after the stream: write as it comes
        funnel.notices.append("alignment: no text-image scorer configured (data.funnel.alignment_model): not checked")
        write(survivors())
        bar.close()
        return funnel

    with ShardWriter(candidates_dir, max_samples_per_shard=dcfg.max_samples_per_shard) as candidates:
        for sample in survivors():
            candidates.write(bucket=sample["bucket"], key=sample["key"], caption=sample["caption"],
                             image=sample["image_png"], meta=sample["meta"])
    bar.close()
    dropped = set()
    if fcfg.rebalance_max_ratio is not None:
        for i in sorted(rebalance(categories, cfg.seed, fcfg.rebalance_max_ratio)):
            funnel.dropped_later("rebalance", keys[i], f"category {categories[i]} over its share")
            dropped.add(keys[i])
    if scorer is None:
        funnel.notices.append("alignment: no text-image scorer configured (data.funnel.alignment_model): not checked")
    else:
        dropped |= _misaligned(candidates_dir, min(resolutions), dropped, scorer, fcfg.min_alignment, funnel)
    write(s for s in iter_samples(candidates_dir, load_images="png") if s["meta"]["source_key"] not in dropped)
    shutil.rmtree(candidates_dir, ignore_errors=True)
    return funnel


def _misaligned(candidates_dir: Path, resolution: int, dropped: set, scorer: Callable, threshold: float,
                funnel: Funnel) -> set:
    """Keys of records whose image at the smallest resolution stage (every kept record has one) scores below
    threshold against its caption."""
    out = set()
    images = (s for s in iter_samples(candidates_dir, load_images=True)
              if s["meta"]["resolution"] == resolution and s["meta"]["source_key"] not in dropped)
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
