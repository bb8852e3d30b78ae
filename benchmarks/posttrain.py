"""Measure the post-training stages: run sft -> preference -> reward -> dpo -> grpo (or the subset in the config's
`post_training`) on an existing run's last pretrain rung, as plain functions, with config overrides.

python benchmarks/posttrain.py --run runs/NAME --out posttrain/NAME [--init STAGE] [--set key=value ...]

Prints one line per stage (seconds and its own metrics) and one per evaluation (the eval stage the pipeline runs,
with the preset's eval settings unless overridden), so each stage's change in held-out accuracy is visible: each
evaluation is paired with the one before it (the run's own eval of the starting stage when there is no baseline),
so the lines carry the paired gains and their 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from kiln.config import load_config
from kiln.tracking import Tracker
from stages.common import run_without_orchestration

class JsonlTracker(Tracker):
    """Keeps a stage's logged metrics in <stage>/metrics.jsonl (no MLflow), e.g. GRPO's reward and KL per step."""

    def __init__(self, out_dir: Path):
        super().__init__(None)
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.write_text("")

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")


REPORTED = ("heldout/single/colour_shape", "heldout/single/colour", "heldout/count/count", "heldout/relation/relation",
            "heldout/all/score", "train/single/colour_shape", "train/all/score")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished pipeline run folder (runs/NAME)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--init", help="the run's stage to start from (a folder name in the run, e.g. dpo); "
                                       "default: the last pretrain rung")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip evaluating the starting stage (its eval in the run, eval-STAGE, is paired instead)")
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    cfg = load_config(args.preset, args.overrides)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    vae, last = run / "vae", run / (args.init or f"pretrain-{cfg.train.rungs[-1].resolution}")
    previous = {"eval": run / f"eval-{last.name}"}  # the last evaluation, paired with the next

    def stage(name: str, module: str, inputs: dict) -> Path:
        if module == "eval" and previous["eval"].exists():
            inputs = {**inputs, "previous": previous["eval"]}
        start = time.perf_counter()
        run_without_orchestration([(name, module, inputs)], cfg, out, make_tracker=JsonlTracker)
        metrics = json.loads((out / name / "manifest.json").read_text()).get("metrics", {})
        row = {"stage": name, "seconds": round(time.perf_counter() - start, 1)}
        if module == "eval":
            row.update({key: round(metrics[f"eval/{key}"], 3) for key in REPORTED})
            row.update({key[len("eval/"):]: round(value, 3) for key, value in metrics.items() if "/gain/" in key})
            previous["eval"] = out / name
        else:
            row.update({key: round(value, 4) for key, value in metrics.items() if isinstance(value, (int, float))})
        print("posttrain", json.dumps(row), flush=True)
        return out / name

    if not args.no_baseline:
        stage("eval-pretrain", "eval", {"model": last})
    post = cfg.post_training
    if "sft" in post:
        last = stage("sft", "sft", {"latents": run / "latents", "vae": vae, "init": last})
        stage("eval-sft", "eval", {"model": last})
    pairs = stage("preference", "preference", {"model": last, "vae": vae}) if "preference" in post else None
    reward = stage("reward", "reward", {"pairs": pairs, "vae": vae, "data": run / "data"}) if "reward" in post else None
    if "dpo" in post:
        last = stage("dpo", "dpo", {"pairs": pairs, "init": last, "vae": vae})
        stage("eval-dpo", "eval", {"model": last})
    if "grpo" in post:
        last = stage("grpo", "grpo", {"init": last, "vae": vae, "reward": reward})
        stage("eval-grpo", "eval", {"model": last})


if __name__ == "__main__":
    main()
