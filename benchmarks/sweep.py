"""Run benchmarks/ablation.py for several named override sets at once (one process each) and print one table.

Meant for a GPU, where one tiny-preset DiT leaves the chip mostly idle: 15 processes share it (start the CUDA MPS
daemon first, `nvidia-cuda-mps-control -d`, so their kernels overlap). Each process retrains the pretrain ladder
of an existing run with its overrides and evaluates every rung on the same larger prompt set (see ablation.py).

python benchmarks/sweep.py --run runs/NAME --out sweeps/NAME [--only A_base,E_64heavy] [--parallel 15]
    [--limit-s 400] [--set key=value ...]   # --set applies to every schedule (e.g. text_encoder.path=...)

Writes OUT/<name>.log per schedule and OUT/summary.jsonl (one row per evaluated rung), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def rung_steps(steps_64: int, steps_128: int) -> list[str]:
    return [f"train.rungs.0.steps={steps_64}", f"train.rungs.1.steps={steps_128}"]


# Overrides of the tiny preset. Costs on the 2-core CPU (seconds per step, measured with benchmarks/mfu.py):
# 64 px 0.13 at batch 32 / 0.10 at 16; 128 px 0.26 at 32 / 0.14 at 16. "same CPU cost" below means the same sum.
SCHEDULES = {
    "A_base": [],
    "A_seed1": ["seed=1"],
    "A_fp32": ["train.precision=fp32"],  # bf16 autocast (the GPU default) against fp32
    "B_lr2x": ["train.optim.lr=0.002", "train.rungs.1.lr=0.001"],
    "C_lrhalf": ["train.optim.lr=0.0005", "train.rungs.1.lr=0.00025"],
    "D_128only": ["train.rungs=[{resolution: 128, steps: 2380, batch_size: 32, lr: 0.001}]"],  # same CPU cost
    "E_64heavy": rung_steps(3000, 1000),  # same CPU cost (+3%)
    "F_ema999": ["train.optim.ema_decay=0.999"],
    "G_ema995": ["train.optim.ema_decay=0.995"],
    "H_b64": ["train.rungs.0.batch_size=64", "train.rungs.1.batch_size=64", *rung_steps(750, 850)],
    "I_data5000": ["data.samples_per_resolution=5000"],
    "K_6layers": ["model.num_layers=6", *rung_steps(1000, 1133)],  # same FLOPs
    "L_6heads": ["model.num_attention_heads=6", *rung_steps(750, 850)],  # about the same FLOPs
    "N_b16": ["train.rungs.0.batch_size=16", "train.rungs.1.batch_size=16", *rung_steps(3000, 3400)],
    "O_2xsteps": rung_steps(3000, 3400),  # twice the CPU cost
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished pipeline run folder (runs/NAME)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", help="comma-separated schedule names (default: all)")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--limit-s", type=float, default=None, help="stop every process this long after the start")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SCHEDULES)
    unknown = [name for name in names if name not in SCHEDULES]
    if unknown:
        raise SystemExit(f"sweep: unknown schedule(s) {', '.join(unknown)} (known: {', '.join(SCHEDULES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def run(name: str) -> list[dict]:
        sets = [arg for override in (*SCHEDULES[name], *args.overrides) for arg in ("--set", override)]
        command = [sys.executable, "benchmarks/ablation.py", "--run", args.run, "--out", str(out / name), *sets]
        timeout = None if args.limit_s is None else max(1.0, args.limit_s - (time.monotonic() - started))
        log = out / f"{name}.log"
        with log.open("w") as handle:
            try:
                status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                status = "timeout"
        rows = [{"schedule": name, "overrides": SCHEDULES[name], **json.loads(line[len("ablation "):])}
                for line in log.read_text().splitlines() if line.startswith("ablation ")]
        with (out / "summary.jsonl").open("a") as summary:
            for row in rows:
                summary.write(json.dumps(row) + "\n")
        print(f"{name}: exit {status}, {len(rows)} rung(s) evaluated", flush=True)
        return rows

    with ThreadPoolExecutor(args.parallel) as pool:
        results = [row for rows in pool.map(run, names) for row in rows]
    print(f"{'schedule':12s} {'rung':>14s} {'train s':>8s} {'loss':>7s} {'held-out single':>15s} "
          f"{'train single':>12s} {'count':>6s} {'relation':>8s}")
    for row in results:
        print(f"{row['schedule']:12s} {Path(row['stage']).name:>14s} {row['train_s']:8} {row['final_loss']:7} "
              f"{row['heldout/single/colour_shape']:15} {row['train/single/colour_shape']:12} "
              f"{row['heldout/count/count']:6} {row['heldout/relation/relation']:8}")


if __name__ == "__main__":
    main()
