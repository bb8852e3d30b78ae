"""The Kiln pipeline as a Prefect flow: data -> vae -> latents -> pretrain rungs -> sft -> preference -> reward ->
dpo -> grpo, with an eval stage after every stage that trains the generator. The stages, their order, wiring and
cache keys are declared in stages/registry.py; this module runs them.

Every stage is a Prefect task tagged `gpu` and an MLflow child run nested in the pipeline's parent run. A stage
whose output folder already holds a manifest with the same cache key (same stage config, same input content,
same code it uses) is skipped, and its MLflow run points at the run that produced it, unless its output no longer
matches the manifest's content hash (a file changed since), which reruns it. `force`, `from_stage` and `only` (the
CLI's --force, --from, --only) override that per stage: see `stage_modes`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from datetime import datetime
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from kiln.checkpoint import resolve_checkpoint
from kiln.weights import check_pretrained, pretrained_fingerprint
from kiln.config import KilnConfig, config_from_dict, load_config
from kiln.errors import is_permanent
from kiln.stage_io import read_stage_manifest, write_stage_manifest
from kiln.tracking import Tracker, register_model, start_run
from stages.registry import STAGES, pipeline_plan, stage_cache_key
from stages.worker import launch


def stage_names(cfg: KilnConfig) -> list[str]:
    """Every stage of this config's pipeline, in the order the flow runs them (stages/registry.py's plan)."""
    return [stage.name for stage in pipeline_plan(cfg)]


def stage_modes(cfg: KilnConfig, force=(), from_stage: str | None = None, only=(),
                run_root: Path | None = None) -> dict[str, str]:
    """{stage: mode} with mode "auto" (skip when its cache key matches), "force" (run), "reuse" (take the existing
    output) or "skip" (not visited).

    force: run these even when current; from_stage: run it and every stage after it; only: run just these, reuse
    the existing outputs of the stages before them (with run_root given: a one-line error if one is missing) and
    leave the stages after them alone."""
    names = stage_names(cfg)
    for option, given in (("--force", force), ("--from", [from_stage] if from_stage else []), ("--only", only)):
        unknown = [name for name in given if name not in names]
        if unknown:
            raise ValueError(f"{option}: no stage {', '.join(unknown)} in this pipeline (stages: {', '.join(names)})")
    if only and (force or from_stage):
        raise ValueError("--only runs just the named stages: it does not combine with --force or --from")
    if only:
        last = max(names.index(name) for name in only)
        modes = {name: "force" if name in only else "reuse" if i < last else "skip" for i, name in enumerate(names)}
        missing = [name for name, mode in modes.items()
                   if mode == "reuse" and run_root is not None and read_stage_manifest(Path(run_root) / name) is None]
        if missing:
            raise FileNotFoundError(f"--only: stage {missing[0]} has no finished output in {Path(run_root) / missing[0]}"
                                    f" to reuse; run it first")
        return modes
    start = names.index(from_stage) if from_stage else len(names)
    return {name: "force" if name in force or i >= start else "auto" for i, name in enumerate(names)}


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry unless the stage failed for a real reason (kiln/errors.py)."""
    return not is_permanent(state.data)


def stage_module(kind: str):
    """The plain-function module that implements a stage kind (stages/<kind>.py)."""
    return importlib.import_module(STAGES[kind].module)


def gpu_slot(limit_name: str | None):
    """One slot of the named Prefect global concurrency limit while a stage computes (none when unnamed; a limit
    that is not defined on the server limits nothing)."""
    return concurrency(limit_name, occupy=1, strict=False) if limit_name else contextlib.nullcontext()


def publish_funnel_report(out_dir: Path) -> None:
    """A curating data stage's funnel report (funnel_report.json) as a Prefect table artifact of the flow run."""
    report_file = out_dir / "funnel_report.json"
    if not report_file.exists():
        return
    from prefect.artifacts import create_table_artifact

    report = json.loads(report_file.read_text())
    rows = [{**row, "examples": "; ".join(row["examples"])} for row in report["operators"]]
    notes = report["failed_sources"] + report["notices"]
    create_table_artifact(table=rows, key="curation-funnel",
                          description=f"{report['seen']} seen, {report['kept']} kept. " + " ".join(notes))


def claim_output(out_dir: Path, key: str) -> Path | None:
    """Before a stage runs: keep its folder when it holds an unfinished run with this cache key (its checkpoints
    are what the stage resumes from); otherwise move what is there (a finished output being rerun, or an unfinished
    run under another config or code) to RUN/.superseded/, so nothing is lost and nothing stale is resumed.
    Returns where the old contents went, if anywhere."""
    started, moved = out_dir / "started.json", None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        same_run = started.exists() and json.loads(started.read_text()).get("cache_key") == key
        if (out_dir / "manifest.json").exists() or not same_run:
            moved = out_dir.parent / ".superseded" / f"{out_dir.name}-{datetime.now():%Y%m%dT%H%M%S%f}"
            moved.parent.mkdir(exist_ok=True)
            os.replace(out_dir, moved)
            print(f"{out_dir.name}: previous output moved to {moved}")
    out_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps({"cache_key": key}))
    return moved


def output_damage(kind: str, out_dir: Path, manifest: dict) -> str | None:
    """Why a finished output can no longer be reused (a file changed, truncated or gone since its stage wrote the
    manifest), or None when its content hash still matches the manifest's."""
    try:
        found = STAGES[kind].output_hash(out_dir)
    except (OSError, ValueError) as error:  # e.g. a shard manifest that is gone or no longer parses
        return f"can no longer be read ({error})"
    recorded = str(manifest.get("content_hash"))
    if found != recorded:
        return f"changed since it finished (content hash {found[:12]}, manifest {recorded[:12]})"
    return None


def reusable(name: str, kind: str, mode: str, out_dir: Path, existing: dict | None, key: str) -> bool:
    """Whether the finished output in out_dir stands in for running the stage: it is to be reused (--only), or
    its cache key is current; and its files still hash to the manifest's content hash. A changed output is rerun
    (one line says why), or under --only, which runs nothing else, is an error."""
    if existing is None or not (mode == "reuse" or mode == "auto" and existing.get("cache_key") == key):
        return False
    damage = output_damage(kind, out_dir, existing)
    if damage and mode == "reuse":
        raise ValueError(f"--only: stage {name}'s output in {out_dir} {damage}; run it again first")
    if damage:
        print(f"{name}: rerunning, its finished output {damage}")
    return damage is None


@task(name="stage", tags=["gpu"], cache_policy=NO_CACHE, task_run_name="{name}", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_transient)
def stage_task(name: str, kind: str, cfg_tree: dict, inputs: dict, run_root: str, parent_run_id: str | None,
               rung_index: int | None = None, modes: dict | None = None) -> str:
    """Run one stage (or skip it when its output is current) inside its own MLflow child run."""
    cfg = config_from_dict(cfg_tree)
    mode = (modes or {}).get(name, "auto")
    out_dir = Path(run_root) / name
    if mode == "skip":
        return str(out_dir)
    if mode == "reuse" and read_stage_manifest(out_dir) is None:
        raise FileNotFoundError(f"--only: stage {name} has no finished output in {out_dir} to reuse; run it first")
    out_dir.mkdir(parents=True, exist_ok=True)
    input_hashes = {}
    for key, path in inputs.items():
        if path is None:
            continue
        manifest = read_stage_manifest(Path(path))
        if manifest is None:
            raise FileNotFoundError(f"{name}: input '{key}' at {path} has no manifest.json (its stage did not finish)")
        input_hashes[key] = manifest["content_hash"]
    if STAGES[kind].trains_generator and inputs.get("init") is None and cfg.model.pretrained:
        input_hashes["pretrained"] = pretrained_fingerprint(cfg)  # it starts from the released weights
    key = stage_cache_key(cfg, kind, input_hashes, rung_index)
    tags = {"kiln.stage": name, "kiln.cache_key": key, "kiln.pipeline_run": Path(run_root).name}
    existing = read_stage_manifest(out_dir)
    reuse = reusable(name, kind, mode, out_dir, existing, key)
    tracker = start_run(cfg.experiment, name, parent_run_id, tags) if parent_run_id else Tracker(None)
    if reuse:
        tracker.set_tags({"kiln.skipped": "true", "kiln.produced_by": existing.get("mlflow_run_id", "")})
        tracker.log_metrics({k: v for k, v in existing.get("metrics", {}).items() if isinstance(v, (int, float))})
        tracker.end()
        return str(out_dir)
    superseded = claim_output(out_dir, key)
    tracker.log_params(cfg.model_dump(mode="json"))
    tracker.set_tags({"kiln.output": str(out_dir.resolve()),
                      **({"kiln.superseded": str(superseded)} if superseded else {})})
    module = stage_module(kind)
    started = time.time()
    try:
        extra = {"rung_index": rung_index} if rung_index is not None else {}
        with gpu_slot(cfg.gpu_concurrency_limit):
            if cfg.distributed.world_size > 1 and STAGES[kind].data_parallel:
                result = launch(kind, cfg, inputs, out_dir, tracker.run_id, rung_index)  # torchrun, N processes
            else:
                result = module.run(cfg, inputs, out_dir, tracker, **extra)
    except BaseException:
        tracker.end("FAILED")
        raise
    seconds = time.time() - started
    tracker.log_metrics({"stage_seconds": seconds})
    publish_funnel_report(out_dir)
    write_stage_manifest(
        out_dir, stage=name, cache_key=key, config=cfg.model_dump(mode="json"),
        inputs={k: str(Path(v).resolve()) for k, v in inputs.items() if v is not None},
        input_hashes=input_hashes, content_hash=result.content_hash, metrics=result.metrics,
        mlflow_run_id=tracker.run_id, seconds=seconds,
    )
    tracker.end()
    return str(out_dir)


COMPARISON_METRICS = {
    "heldout single colour+shape": "eval/heldout/single/colour_shape",
    "heldout colour": "eval/heldout/all/colour",
    "heldout shape": "eval/heldout/all/shape",
    "heldout count": "eval/heldout/count/count",
    "heldout relation": "eval/heldout/relation/relation",
    "heldout reward": "eval/heldout/all/score",
    "train single colour+shape": "eval/train/single/colour_shape",
    "train reward": "eval/train/all/score",
}


# Gains over the previous evaluated stage (same prompts and noise), shown as "gain [95% CI]".
GAIN_COLUMNS = {
    "gain heldout single colour+shape": "eval/gain/heldout/single/colour_shape",
    "gain heldout count": "eval/gain/heldout/count/count",
    "gain heldout relation": "eval/gain/heldout/relation/relation",
    "gain heldout reward": "eval/gain/heldout/all/score",
    "gain train count": "eval/gain/train/count/count",
    "gain train reward": "eval/gain/train/all/score",
}


def _gain(metrics: dict, key: str) -> str | None:
    if key not in metrics:
        return None
    return f"{metrics[key]:+.3f} [{metrics[key + '_low']:+.3f}, {metrics[key + '_high']:+.3f}]"


# Task captions (your own images): held-out split loss, FD and alignment (stages/eval_captions.py).
CAPTIONS_METRICS = {
    "heldout loss": "eval/captions/heldout_loss",
    "FD": "eval/captions/frechet_distance",
    "FD of training images": "eval/captions/frechet_distance_train_images",
    "alignment": "eval/captions/alignment",
    "alignment, other caption": "eval/captions/alignment_other_caption",
    "alignment, real images": "eval/captions/alignment_real_images",
}
CAPTIONS_GAINS = {"gain alignment": "eval/gain/captions/alignment", "gain heldout loss": "eval/gain/captions/heldout_loss"}


def comparison_rows(evals: dict[str, dict], task: str = "synthetic") -> list[dict]:
    """One row per evaluated stage, the columns people compare stages by, and its paired gain over the stage before."""
    columns, gains = (COMPARISON_METRICS, GAIN_COLUMNS) if task == "synthetic" else (CAPTIONS_METRICS, CAPTIONS_GAINS)
    return [{"stage": name.removeprefix("eval-"),
             **{label: metrics.get(key) for label, key in columns.items()},
             **{label: _gain(metrics, key) for label, key in gains.items()}}
            for name, metrics in evals.items()]


def default_run_name(cfg: KilnConfig) -> str:
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="kiln-pipeline", log_prints=True)
def pipeline(preset: str = "tiny", overrides: list[str] | None = None, run_name: str | None = None,
             track: bool = True, force: list[str] | None = None, from_stage: str | None = None,
             only: list[str] | None = None) -> dict:
    """Run the whole pipeline; returns {stage name: output folder}. force / from_stage / only: see stage_modes."""
    cfg = load_config(preset, overrides or [])
    if cfg.model.pretrained:  # before any compute: the released weights fit the configured model
        check_pretrained(cfg)
    run_name = run_name or default_run_name(cfg)
    run_root = Path(cfg.run_dir) / run_name
    modes = stage_modes(cfg, force or (), from_stage, only or (), run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    tree = cfg.model_dump(mode="json")
    parent = start_run(cfg.experiment, run_name, tags={"kiln.pipeline_run": run_name, "kiln.preset": preset}) \
        if track else None
    parent_id = parent.run_id if parent else None
    if parent:
        parent.log_params(tree)
    plan = pipeline_plan(cfg)
    outputs: dict[str, str] = {}
    try:
        common = dict(cfg_tree=tree, run_root=str(run_root), parent_run_id=parent_id, modes=modes)
        for stage in plan:
            inputs = {key: outputs[source] if source else None for key, source in stage.inputs.items()}
            outputs[stage.name] = stage_task(stage.name, stage.kind, inputs=inputs, rung_index=stage.rung_index,
                                             **common)
    except BaseException:
        if parent:
            parent.end("FAILED")
        raise
    if parent:
        evals = {stage.name: read_stage_manifest(Path(outputs[stage.name])).get("metrics", {}) for stage in plan
                 if stage.kind == "eval" and modes[stage.name] != "skip"}
        if evals:
            parent.log_metrics(list(evals.values())[-1])  # the final model's evaluation
            parent.log_table(comparison_rows(evals, cfg.task_kind), "stage_comparison.json")
        parent.set_tags({"kiln.run_dir": str(run_root.resolve())})
        # The final generator in the model registry, aliased by this pipeline run's name.
        final = next((stage.name for stage in reversed(plan)
                      if STAGES[stage.kind].trains_generator and modes[stage.name] != "skip"), None)
        if final:
            manifest = read_stage_manifest(Path(outputs[final]))
            model_name = f"{cfg.experiment}-{cfg.name}"
            version = register_model(model_name, str(resolve_checkpoint(Path(outputs[final])).resolve()),
                                     manifest.get("mlflow_run_id"), run_name)
            parent.set_tags({"kiln.registered_model": f"{model_name}/{version}", "kiln.final_stage": final})
        parent.end()
    return outputs
