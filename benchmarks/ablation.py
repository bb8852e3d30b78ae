"""Measure one training choice: retrain the pretrain ladder of an existing run with config overrides and evaluate it.

Reuses the run's trained VAE (and its data and latents when the overrides leave the text encoder and the data
section alone; otherwise the data and latents stages are rerun with the new settings and the run's VAE), so a
comparison costs only the DiT training.

python benchmarks/ablation.py --run runs/NAME --out ablations/NAME [--set key=value ...] [--eval-prompts 36]
python benchmarks/ablation.py --run runs/NAME --out ablations/NAME-eval --eval-only   # the run's own rungs
python benchmarks/ablation.py --run runs/NAME --out OUT --start-rung 1 --set train.rungs.1.steps=...  # the last rung only
python benchmarks/ablation.py --run runs/NAME --out OUT --end-rung 1 --set train.rungs.0.steps=...  # the first rung only
python benchmarks/ablation.py --run runs/NAME --out OUT --retrain-vae --set vae.train.kl_weight=...  # a new VAE and latents too

Prints one line per rung: training seconds, final loss, and held-out / training accuracies (the same larger eval
for every row, so rows compare).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from kiln.config import DataConfig, TextEncoderConfig, config_from_dict, load_config
from kiln.stage_io import read_stage_manifest, write_stage_manifest
from kiln.tracking import Tracker
from stages import eval as eval_stage
from stages import pretrain
from stages.common import run_without_orchestration

REPORTED = ("heldout/single/colour_shape", "heldout/single/colour", "train/single/colour_shape",
            "heldout/count/count", "heldout/relation/relation", "heldout/all/score")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished pipeline run folder (runs/NAME)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--eval-prompts", type=int, default=36, help="prompts per kind and split (2 images each)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the run's own pretrain rungs, no training")
    parser.add_argument("--start-rung", type=int, default=0,
                        help="retrain from this rung on; earlier rungs are the run's own (only the later ones cost)")
    parser.add_argument("--end-rung", type=int, default=None,
                        help="stop before this rung (a cheap screen of the early rungs)")
    parser.add_argument("--retrain-vae", action="store_true",
                        help="train the VAE again with the overrides (then the latents), on the run's data")
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    cfg = load_config(args.preset, [*args.overrides, f"eval.prompts_per_kind={args.eval_prompts}",
                                    "cadence.sample_every=1000000", "cadence.checkpoint_every=1000000"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.eval_only:  # the run's own config (from its data stage's manifest), with the larger eval
        tree = read_stage_manifest(run / "data")["config"]
        cfg = config_from_dict({**tree, "eval": {**tree["eval"], "prompts_per_kind": args.eval_prompts}})
        for rung in cfg.train.rungs:
            stage_dir = run / f"pretrain-{rung.resolution}"
            report(cfg, stage_dir, run, out, rung, read_stage_manifest(stage_dir)["metrics"], seconds=None)
        return

    source = read_stage_manifest(run / "data")["config"]
    # The run's seed draws the synthetic data and the rungs' resolutions size it: another seed or ladder needs its
    # own shards.
    same_data = (TextEncoderConfig(**source["text_encoder"]) == cfg.text_encoder
                 and DataConfig(**source["data"]) == cfg.data and source["seed"] == cfg.seed
                 and [r["resolution"] for r in source["train"]["rungs"]] == [r.resolution for r in cfg.train.rungs])
    data = run / "data" if same_data else out / "data"
    if not same_data:  # the cached shards are of other data or the old encoder's: redo them
        run_without_orchestration([("data", "data", {})], cfg, out)
    if args.retrain_vae:  # the rungs and evals below then read this VAE
        run_without_orchestration([("vae", "vae", {"data": data})], cfg, out)
        run = _with_vae(run, out)
    if same_data and not args.retrain_vae:
        latents = run / "latents"
    else:  # latents of the new data or from the new VAE
        run_without_orchestration([("latents", "latents", {"data": data, "vae": run / "vae"})], cfg, out)
        latents = out / "latents"

    previous = None
    for index, rung in enumerate(cfg.train.rungs):
        if args.end_rung is not None and index >= args.end_rung:
            break
        if index < args.start_rung:  # the run's own rung: the next one starts from it
            previous = run / f"pretrain-{rung.resolution}"
            continue
        stage_dir = out / f"pretrain-{rung.resolution}"
        stage_dir.mkdir()
        start = time.perf_counter()
        result = pretrain.run(cfg, {"latents": latents, "vae": run / "vae", "init": previous}, stage_dir,
                              Tracker(None), index)
        seconds = time.perf_counter() - start
        # load_stage reads the config and the VAE location from the stage manifest
        write_stage_manifest(stage_dir, stage=stage_dir.name, config=cfg.model_dump(mode="json"),
                             inputs={"vae": str(run / "vae")}, metrics=result.metrics)
        previous = stage_dir
        report(cfg, stage_dir, run, out, rung, result.metrics, seconds)


def _with_vae(run: Path, out: Path) -> Path:
    """A run folder that is `run` with out/vae as its VAE (links to the run's other stages)."""
    mixed = out / "run-with-new-vae"
    mixed.mkdir()
    for stage in run.iterdir():
        if stage.name != "vae":
            (mixed / stage.name).symlink_to(stage.resolve())
    (mixed / "vae").symlink_to((out / "vae").resolve())
    return mixed


def report(cfg, stage_dir: Path, run: Path, out: Path, rung, train_metrics: dict, seconds: float | None) -> None:
    metrics = eval_stage.run(cfg, {"model": stage_dir, "vae": run / "vae"}, out / f"eval-{stage_dir.name}",
                             Tracker(None)).metrics
    row = {"stage": str(stage_dir), "steps": rung.steps, "train_s": seconds and round(seconds, 1),
           "final_loss": round(train_metrics["final_loss"], 4),
           **{key: round(metrics[f"eval/{key}"], 3) for key in REPORTED}}
    print("ablation", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
