"""Curation throughput and memory: the whole funnel (sources -> operators -> duplicates -> bucketed shards with
caption embeddings) with worker processes on every core against the same work in one process, at two dataset sizes.

python benchmarks/funnel.py [--sizes 1000 4000] [--image-size 256] [--procs 2] [--kind imagefolder|webdataset]
                            [--repeats 3]

Writes a planted image folder per size (JPEGs of random sharp blocks; 1 in 20 blank, 1 in 20 a near duplicate; with
--kind webdataset the same images packed into tar shards of 500), then
runs each (size, processes) case in a fresh Python process, --repeats times with the cases alternating (1, N, 1,
N, ...: a slow spell of this shared machine hits both), and prints the median seconds and samples/s, the ratio of
the medians to one process at the same size (measured in this run), the range of the per-repeat ratios, and peak
resident memory of the main process and of the largest worker (the sources stream, so neither should grow with
the dataset); it stops if any run's shards differ. Both cases run the same operators, encoders and writer
(data/curate.py with num_proc 1 or N; with N the workers hand samples back through a file per chunk); the clock
starts after the imports and the text encoder are loaded and covers everything else:
opening the source, the operators, the duplicate checks, caption embeddings, the shards and the manifest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_folder(folder: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    with (folder / "metadata.jsonl").open("w") as meta:
        for i in range(n):
            rng = np.random.default_rng(i)
            if i % 20 == 7:  # a blank image
                array = np.full((size, size, 3), 128, dtype=np.uint8)
            else:
                seed = i - 1 if i % 20 == 13 else i  # a near duplicate of the previous image
                blocks = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
                array = np.asarray(Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST))
                array = (array.astype(int) + rng.integers(-8, 8, array.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(array).save(folder / f"{i:06d}.jpg", quality=90)
            meta.write(json.dumps({"file_name": f"{i:06d}.jpg", "caption": f"random blocks number {i}"}) + "\n")


def pack_tars(folder: Path, tars: Path, per_shard: int = 500) -> None:
    """The folder's images and captions as WebDataset shards (jpg, txt)."""
    import webdataset as wds

    tars.mkdir(parents=True)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for start in range(0, len(rows), per_shard):
        with wds.TarWriter(str(tars / f"shard-{start // per_shard:06d}.tar")) as tar:
            for row in rows[start:start + per_shard]:
                tar.write({"__key__": row["file_name"].split(".")[0], "jpg": (folder / row["file_name"]).read_bytes(),
                           "txt": row["caption"]})


def one_case(path: str, out: str, procs: int, kind: str) -> dict:
    """Runs in its own process: curate the source, report seconds and peak memory."""
    import resource

    from data.curate import curate
    from kiln.config import load_config
    from kiln.text_encoder import build_text_encoder

    columns = {"image_column": "jpg", "caption_column": "txt"} if kind == "webdataset" else {}
    sources = json.dumps([{"kind": kind, "path": path, **columns}])
    cfg = load_config("tiny", [f"data.sources={sources}", f"data.funnel.num_proc={procs}"])
    import datasets  # noqa: F401 - imports (1.3 s) and the text encoder are process start-up, not funnel work

    encoder = build_text_encoder(cfg.text_encoder)  # the data stage builds it before curating, too
    started = time.perf_counter()
    funnel = curate(cfg, Path(out), encoder, progress=False)
    seconds = time.perf_counter() - started
    report = funnel.report()
    return {"seconds": seconds, "seen": report["seen"], "kept": report["kept"],
            "content_hash": json.loads((Path(out) / "manifest.json").read_text())["content_hash"],
            "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--kind", choices=["imagefolder", "webdataset"], default="imagefolder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("PATH", "OUT", "PROCS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_case(args.one[0], args.one[1], int(args.one[2]), args.kind)))
        return
    with tempfile.TemporaryDirectory(prefix="kiln-funnel-") as tmp:
        rows = []
        for n in args.sizes:
            folder = Path(tmp) / f"images-{n}"
            write_folder(folder, n, args.image_size)
            source = folder
            if args.kind == "webdataset":
                source = Path(tmp) / f"tars-{n}"
                pack_tars(folder, source)
            runs = {1: [], args.procs: []}
            for repeat in range(args.repeats):
                for procs in runs:
                    out = Path(tmp) / f"out-{n}-{procs}-{repeat}" / "shards"
                    line = subprocess.run([sys.executable, __file__, "--one", str(source), str(out), str(procs),
                                           "--kind", args.kind], check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1]
                    runs[procs].append(json.loads(line))
            hashes = {r["content_hash"] for results in runs.values() for r in results}
            if len(hashes) != 1:
                raise SystemExit(f"{n} samples: the shards differ between runs or process counts: {sorted(hashes)}")
            base = statistics.median(r["seconds"] for r in runs[1])
            for procs, results in runs.items():
                seconds = statistics.median(r["seconds"] for r in results)
                paired = [one["seconds"] / r["seconds"] for one, r in zip(runs[1], results)]
                rows.append((n, procs, results[0]["kept"], results[0]["seen"], seconds, base / seconds, paired,
                             max(r["main_mb"] for r in results), max(r["worker_mb"] for r in results)))
    print(f"\ncuration funnel, {args.image_size} px JPEGs ({args.kind}), tiny preset (64 and 128 px rungs):")
    print(f"median of {args.repeats} runs per case; 'range' is the lowest and highest ratio of one run pair; "
          f"every run wrote byte-identical shards")
    print(f"{'samples':>8} {'procs':>5} {'kept':>6} {'seconds':>8} {'samples/s':>10} {'vs 1 proc':>9} "
          f"{'range':>11} {'main MB':>8} {'worker MB':>9}")
    for n, procs, kept, seen, seconds, ratio, paired, main_mb, worker_mb in rows:
        spread = f"{min(paired):.2f}-{max(paired):.2f}"
        print(f"{n:>8} {procs:>5} {kept:>6} {seconds:>8.2f} {seen / seconds:>10.1f} {ratio:>8.2f}x {spread:>11} "
              f"{main_mb:>8.0f} {worker_mb:>9.0f}")


if __name__ == "__main__":
    main()
