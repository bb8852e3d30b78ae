"""Train many configuration variants side by side, one process each, and print one table of what they reach.

Meant for a GPU, where one tiny model leaves the chip mostly idle (start the CUDA MPS daemon first,
`nvidia-cuda-mps-control -d`, so the processes' kernels overlap); on the CPU run one at a time (`--parallel 1`).
Two kinds of job:

- ladder: the tiny pipeline's pretraining from scratch (data -> VAE -> latents -> every rung, each rung evaluated).
  Seeds and VAE settings: how far held-out accuracy moves with the data draw and the VAE.
- system: one compare-systems preset (configs/ddpm.yaml ...) trained on data / VAE / latents / features made once
  for all systems (as `kiln compare-systems` does), evaluated at several sampling-step counts.

python benchmarks/variants.py --out OUT [--only a,b] [--parallel 16] [--limit-s 500] [--set key=value ...]
python benchmarks/variants.py --out OUT --job NAME [--set ...]      # one job in this process (what workers run)

Writes OUT/<job>.log and OUT/summary.jsonl (one row per evaluated model) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SYSTEM_STEPS = (5, 10, 25, 50, 250)
REPORTED = ("heldout/single/colour_shape", "heldout/single/colour", "heldout/single/shape", "heldout/all/score",
            "heldout/all/baseline_score", "heldout/count/count", "heldout/relation/relation",
            "heldout/frechet_distance", "images_per_s")

# name -> (kind, preset, overrides)
JOBS = {
    **{f"tiny_s{s}": ("ladder", "tiny", [f"seed={s}"]) for s in (0, 1, 2)},
    **{f"tiny_kl1e-4_s{s}": ("ladder", "tiny", [f"seed={s}", "vae.train.kl_weight=0.0001"]) for s in (0, 1, 2)},
    **{f"tiny_kl1e-3_s{s}": ("ladder", "tiny", [f"seed={s}", "vae.train.kl_weight=0.001"]) for s in (0,)},
    **{name: ("system", name, []) for name in ("ddpm", "sd1", "sd2", "dit", "sd3", "qwen-image-tiny")},
    # Which of backbone and objective makes the epsilon systems fail at this budget: swap them.
    "unet_flow": ("system", "sd1", ["objective.kind=flow", "sampler.kind=euler"]),
    "mmdit_eps": ("system", "sd3", ["objective.kind=epsilon", "objective.beta_schedule=scaled_linear",
                                    "sampler.kind=ddim"]),
    "sd1_2xsteps": ("system", "sd1", ["train.rungs.0.steps=4000"]),
    "sd1_4xsteps": ("system", "sd1", ["train.rungs.0.steps=8000"]),
    "ddpm_4xsteps": ("system", "ddpm", ["train.rungs.0.steps=8000"]),
}
SHARED_ROOT = "shared"  # the systems' data / vae / latents / features


def _row(job: str, stage: str, metrics: dict, extra: dict) -> None:
    row = {"job": job, "stage": stage, **extra,
           **{key: round(metrics[f"eval/{key}"], 4) for key in REPORTED if f"eval/{key}" in metrics}}
    print("variant " + json.dumps(row), flush=True)


def _pretrain(cfg, index: int, latents: Path, vae: Path, init: Path | None, out: Path) -> tuple[Path, dict]:
    from kiln.stage_io import write_stage_manifest
    from kiln.tracking import Tracker
    from stages import pretrain

    stage_dir = out / f"pretrain-{cfg.train.rungs[index].resolution}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = pretrain.run(cfg, {"latents": latents, "vae": vae, "init": init}, stage_dir, Tracker(None), index)
    metrics = {**result.metrics, "train_s": round(time.perf_counter() - started, 1)}
    # the eval stage reads the config and the VAE's location from this manifest
    write_stage_manifest(stage_dir, stage=stage_dir.name, config=cfg.model_dump(mode="json"),
                         inputs={"vae": str(vae)}, metrics=metrics)
    return stage_dir, metrics


def run_job(name: str, out: Path, overrides: list[str], system_steps=SYSTEM_STEPS) -> None:
    from kiln.config import load_config
    from kiln.stage_io import read_stage_manifest
    from kiln.tracking import Tracker
    from stages import eval as eval_stage
    from stages.common import data_vae_latents, run_without_orchestration

    kind, preset, job_overrides = JOBS[name] if name in JOBS else ("shared", "compare-base", [])
    cfg = load_config(preset, [*job_overrides, *overrides])
    if kind == "shared":
        root = data_vae_latents(cfg, out / SHARED_ROOT)
        run_without_orchestration([("features", "features", {"data": root / "data"})], cfg, root)
        return
    root = out / name
    shared = out / SHARED_ROOT if kind == "system" else data_vae_latents(cfg, root)
    vae_metrics = read_stage_manifest(shared / "vae")["metrics"]
    extra = {"vae_psnr": round(vae_metrics["vae/psnr"], 2), "vae_attempts": vae_metrics.get("vae/attempts"),
             "vae_colour_worst": vae_metrics.get("vae/recon/colour_worst")}
    previous = None
    for index, rung in enumerate(cfg.train.rungs):
        previous, train = _pretrain(cfg, index, shared / "latents", shared / "vae", previous, root)
        extra.update(final_loss=round(train["final_loss"], 4), train_s=train["train_s"])
        step_counts = system_steps if kind == "system" else (cfg.eval.steps,)
        for steps in step_counts:
            ecfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"steps": steps})})
            inputs = {"model": previous, "vae": shared / "vae"}
            if kind == "system":
                inputs["features"] = shared / "features"
            metrics = eval_stage.run(ecfg, inputs, root / f"eval-{previous.name}-{steps}", Tracker(None)).metrics
            _row(name, previous.name, metrics, {**extra, "sampling_steps": steps})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--job", help="run this one job here")
    parser.add_argument("--only", help="comma-separated job names (default: all)")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--limit-s", type=float, default=None, help="stop every job this long after the start")
    parser.add_argument("--system-steps", default=",".join(map(str, SYSTEM_STEPS)),
                        help="sampling-step counts a system is evaluated at")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.job:
        run_job(args.job, out, args.overrides, [int(n) for n in args.system_steps.split(",")])
        return
    names = args.only.split(",") if args.only else list(JOBS)
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        raise SystemExit(f"variants: unknown job(s) {', '.join(unknown)} (known: {', '.join(JOBS)})")
    started = time.monotonic()
    shared_done = threading.Event()
    lock = threading.Lock()

    def launch(name: str) -> str:
        if name != SHARED_ROOT and JOBS[name][0] == "system":
            shared_done.wait()
        timeout = None if args.limit_s is None else max(1.0, args.limit_s - (time.monotonic() - started))
        sets = [a for s in args.overrides for a in ("--set", s)]
        command = [sys.executable, __file__, "--out", str(out), "--job", name, "--system-steps", args.system_steps, *sets]
        t0 = time.monotonic()
        with (out / f"{name}.log").open("w") as log:
            try:
                status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                status = "timeout"
        if name == SHARED_ROOT:
            shared_done.set()
        rows = [json.loads(line[len("variant "):]) for line in (out / f"{name}.log").read_text().splitlines()
                if line.startswith("variant ")]
        with lock, (out / "summary.jsonl").open("a") as summary:
            for row in rows:
                summary.write(json.dumps({**row, "overrides": JOBS.get(name, (None, None, []))[2]}) + "\n")
        line = f"{name}: exit {status}, {time.monotonic() - t0:.0f} s, {len(rows)} rows"
        print(line, flush=True)
        return line

    shared = [SHARED_ROOT] if any(JOBS[n][0] == "system" for n in names) else []
    # The shared job's worker is extra: system jobs only wait while it runs, so --parallel jobs compute at once.
    with ThreadPoolExecutor(max(args.parallel, 1) + len(shared)) as pool:
        list(pool.map(launch, shared + names))
    rows = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()] \
        if (out / "summary.jsonl").exists() else []
    columns = ["job", "stage", "sampling_steps", "vae_psnr", "final_loss", "train_s", *REPORTED]
    print("| " + " | ".join(columns) + " |")
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


if __name__ == "__main__":
    main()
