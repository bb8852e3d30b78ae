"""`kiln compare-systems`: the evolution of image diffusion as measured configurations of this pipeline.

Each system (configs/ddpm.yaml, sd1, sd2, dit, sd3, qwen-image-tiny) extends configs/compare-base.yaml and changes
only the backbone, the objective and the sampler; data, text encoder, VAE, training steps and batch are shared (the
flow checks). One Prefect flow: data -> vae -> latents -> features once, then per system its pretrain rung and an
eval stage per sampling-step count. MLflow: the comparison's parent run, one child run per system holding the
accuracy / Frechet distance / sampling speed against the step count (metric step = sampling steps), and the stage
runs nested under it. The flow writes a table (markdown and JSON) and a plot of accuracy and Frechet distance
against steps for every system, under runs/NAME/ and as artifacts of the parent run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow

from flows.pipeline import stage_task
from kiln.config import load_config
from kiln.geometry import latent_channels
from kiln.models import build_backbone, count_parameters
from kiln.stage_io import read_stage_manifest
from kiln.tracking import start_run
from stages.registry import LATEST_GENERATOR, stage_inputs

SYSTEMS = ("ddpm", "sd1", "sd2", "dit", "sd3", "qwen-image-tiny")
STEP_COUNTS = (5, 10, 25, 50, 100)
# What every system must share with the base (besides what the stages' cache keys already cover).
SHARED = ("data", "text_encoder", "vae", "train", "features", "seed")
# The columns of the comparison: label -> eval metric.
COLUMNS = {
    "heldout colour+shape (single)": "eval/heldout/single/colour_shape",
    "heldout all correct": "eval/heldout/all/correct",
    "heldout verifier score": "eval/heldout/all/score",
    "random-caption baseline score": "eval/heldout/all/baseline_score",
    "FD (heldout)": "eval/heldout/frechet_distance",
    "sampling images/s": "eval/images_per_s",
}


def check_shared(base, system_cfgs: dict) -> None:
    """One line naming the first system and section that differ from the base: the comparison would be unfair."""
    for name, cfg in system_cfgs.items():
        for section in SHARED:
            if getattr(cfg, section) != getattr(base, section):
                raise ValueError(f"compare-systems: system {name} changes '{section}' from compare-base; systems may "
                                 f"change only model, objective and sampler")


def write_report(rows: list[dict], out_dir: Path) -> tuple[Path, Path, Path]:
    """rows: one per (system, steps) with the COLUMNS -> table.md, table.json, accuracy_vs_steps.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["system", "steps", *COLUMNS, "parameters (M)", "train images/s"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    table_md = out_dir / "table.md"
    table_md.write_text("\n".join(lines) + "\n")
    table_json = out_dir / "table.json"
    table_json.write_text(json.dumps({"columns": columns, "rows": rows}, indent=1))

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for system in dict.fromkeys(row["system"] for row in rows):
        mine = [row for row in rows if row["system"] == system]
        steps = [row["steps"] for row in mine]
        for ax, label in zip(axes, ("heldout colour+shape (single)", "heldout verifier score", "FD (heldout)")):
            values = [row.get(label) for row in mine]
            if all(v is not None for v in values):
                ax.plot(steps, values, marker="o", label=system)
    baseline = [row["random-caption baseline score"] for row in rows]
    axes[1].axhline(max(baseline), color="grey", linestyle="--", label="random-caption baseline (max)")
    for ax, label in zip(axes, ("held-out colour+shape accuracy (single objects)", "held-out verifier score",
                                "Frechet distance to real renders (lower is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    plot = out_dir / "accuracy_vs_steps.png"
    figure.savefig(plot, dpi=110)
    plt.close(figure)
    return table_md, table_json, plot


@flow(name="kiln-compare-systems", log_prints=True)
def compare_systems(systems: list[str] | None = None, steps: list[int] | None = None,
                    overrides: list[str] | None = None, run_name: str | None = None, track: bool = True) -> dict:
    """Train and evaluate every system; returns {"rows": [...], "table": path, "plot": path}."""
    systems, steps = list(systems or SYSTEMS), sorted(steps or STEP_COUNTS)
    base = load_config("compare-base", overrides or [])
    system_cfgs = {name: load_config(name, overrides or []) for name in systems}
    check_shared(base, system_cfgs)
    run_name = run_name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    run_root = Path(base.run_dir) / run_name
    run_root.mkdir(parents=True, exist_ok=True)
    parent = start_run(base.experiment, run_name, tags={"kiln.pipeline_run": run_name, "kiln.flow": "compare-systems"}) \
        if track else None
    parent_id = parent.run_id if parent else None
    rows = []
    try:
        common = dict(cfg_tree=base.model_dump(mode="json"), run_root=str(run_root), parent_run_id=parent_id)
        shared: dict[str, str | None] = {}  # stage kind -> its output folder, shared by every system
        for kind in ("data", "vae", "latents", "features"):
            shared[kind] = stage_task(kind, kind, inputs=stage_inputs(kind, shared), **common)
        rung = base.train.rungs[-1].resolution
        for name, cfg in system_cfgs.items():
            system_run = start_run(cfg.experiment, name, parent_id, {"kiln.pipeline_run": run_name,
                                                                      "kiln.system": name}) if parent else None
            tree = cfg.model_dump(mode="json")
            mine = dict(run_root=str(run_root), parent_run_id=system_run.run_id if system_run else None)
            model = stage_task(f"{name}/pretrain-{rung}", "pretrain", cfg_tree=tree, rung_index=0, **mine,
                               inputs=stage_inputs("pretrain", {**shared, LATEST_GENERATOR: None}))
            train_metrics = read_stage_manifest(Path(model))["metrics"]
            backbone = build_backbone(cfg.model, latent_channels(cfg.vae), cfg.text_encoder.dim, "meta")
            parameters = count_parameters(backbone)
            for n in steps:
                eval_tree = {**tree, "eval": {**tree["eval"], "steps": n}}
                out = stage_task(f"{name}/eval-{n}-steps", "eval", cfg_tree=eval_tree, **mine,
                                 inputs=stage_inputs("eval", {**shared, LATEST_GENERATOR: model}))
                metrics = read_stage_manifest(Path(out))["metrics"]
                row = {"system": name, "steps": n, **{label: metrics.get(key) for label, key in COLUMNS.items()},
                       "parameters (M)": round(parameters / 1e6, 2),
                       "train images/s": round(train_metrics.get("images_per_s", float("nan")), 1)}
                rows.append(row)
                if system_run:  # MLflow's x axis is the step count: one curve per metric against steps
                    system_run.log_metrics({key: metrics[key] for key in COLUMNS.values() if key in metrics}, step=n)
            if system_run:
                system_run.log_params({"model.kind": cfg.model.kind, "objective.kind": cfg.objective.kind,
                                       "sampler.kind": cfg.sampler.kind, "eval.cfg": cfg.eval.cfg,
                                       "parameters": parameters})
                system_run.end()
    except BaseException:
        if parent:
            parent.end("FAILED")
        raise
    table_md, table_json, plot = write_report(rows, run_root / "compare")
    _publish(rows, table_md)
    if parent:
        for path in (table_md, table_json, plot):
            parent.log_artifact(path)
        parent.set_tags({"kiln.run_dir": str(run_root.resolve())})
        parent.end()
    print(table_md.read_text())
    return {"rows": rows, "table": str(table_md), "plot": str(plot)}


def _publish(rows: list[dict], table_md: Path) -> None:
    """The comparison as Prefect artifacts of the flow run (a table and the markdown)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(table=rows, key="compare-systems", description="held-out accuracy, Frechet distance and "
                                                                          "sampling speed per system and step count")
    create_markdown_artifact(markdown=table_md.read_text(), key="compare-systems-table")
