"""Data-parallel throughput of one pretrain rung: 1 process against N torchrun processes with the same global batch,
on an existing run's latents, measured back to back in one invocation.

python benchmarks/data_parallel.py --run runs/readme [--rung 1] [--steps 80] [--nproc 2] [--strategy ddp]

Prints the steady-state images/s of each (between the first and the last log point, so start-up, the shard preload
and the final sample grid are left out), the ratio, and both runs' final losses (they train the same batches).
On a CPU each process gets cores / N threads (torchrun sets OMP_NUM_THREADS=1 for N > 1 unless it is set).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kiln.config import load_config
from kiln.tracking import Tracker
from stages import pretrain
from stages.worker import launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a pipeline run folder holding latents/ and vae/ outputs")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rung", type=int, default=1)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    run = Path(args.run)
    for needed in ("latents", "vae"):
        if not (run / needed / "manifest.json").exists():
            parser.error(f"--run {run}: no finished {needed} stage there (run `kiln run` first)")
    common = [f"train.rungs.{args.rung}.steps={args.steps}", "cadence.log_every=10", "cadence.sample_every=100000",
              "cadence.checkpoint_every=100000", "device=cpu", *args.overrides]
    inputs = {"latents": str(run / "latents"), "vae": str(run / "vae")}
    results = {}
    with tempfile.TemporaryDirectory(prefix="kiln-dp-") as tmp:
        for label, processes in (("1 process", 1), (f"{args.nproc} processes ({args.strategy})", args.nproc)):
            cfg = load_config(args.preset, [*common, f"distributed.nproc_per_node={processes}",
                                            f"distributed.strategy={args.strategy}"])
            out = Path(tmp) / f"p{processes}"
            out.mkdir()
            started = time.perf_counter()
            if processes == 1:
                result = pretrain.run(cfg, inputs, out, Tracker(None), rung_index=args.rung)
            else:
                result = launch("pretrain", cfg, inputs, out, None, args.rung)
            results[label] = (result.metrics, time.perf_counter() - started)
    batch = load_config(args.preset, common).train.rungs[args.rung].batch_size
    print(f"\npretrain rung {args.rung}, {args.steps} steps, global batch {batch}:")
    for label, (metrics, seconds) in results.items():
        print(f"  {label:<24} {metrics['images_per_s']:8.1f} img/s steady state   final loss "
              f"{metrics['final_loss']:.5f}   {seconds:.0f} s in all")
    (one, _), (many, _) = results.values()
    print(f"  ratio {many['images_per_s'] / one['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
