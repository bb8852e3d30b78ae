"""`kiln compare RUN [RUN ...]`: the stage-by-stage evaluation table of pipeline runs, read back from MLflow, and a
side-by-side grid of each evaluated stage's samples.

A run is named by its pipeline run name (the `kiln.pipeline_run` tag, i.e. the folder under runs/). The table is
the parent run's `stage_comparison.json`; the grid takes the first images of every `eval-*` stage's sample folder
(the parent run's `kiln.run_dir` tag says where) in one row per stage and run.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient
from PIL import Image, ImageDraw

from kiln.tracking import PARENT_TAG


def parent_run(client: MlflowClient, experiment: str, run_name: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"compare: no MLflow experiment {experiment!r} in this tracking store")
    runs = client.search_runs([exp.experiment_id], f"tags.`kiln.pipeline_run` = '{run_name}'",
                              order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags and r.info.status == "FINISHED"]
    if not parents:
        raise ValueError(f"compare: no finished pipeline run named {run_name!r} in experiment {experiment!r}")
    return parents[0]  # the latest, if the run was repeated


def comparison_table(client: MlflowClient, run) -> tuple[list[str], list[list]]:
    path = client.download_artifacts(run.info.run_id, "stage_comparison.json")
    table = json.loads(Path(path).read_text())
    return table["columns"], table["data"]


def format_table(rows: list[tuple[str, list[str], list[list]]]) -> str:
    """rows: (run name, columns, data) -> one markdown table, a `run` column first."""
    columns = rows[0][1]
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, _, data in rows:
        for row in data:
            cells = [f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v) for v in row]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_grid(stage_dirs: list[tuple[str, Path]], per_stage: int = 6, size: int = 96) -> Image.Image:
    """One row per (label, eval stage folder): its first `per_stage` samples, labelled on the left."""
    label_width = 200
    grid = Image.new("RGB", (label_width + per_stage * size, len(stage_dirs) * size), "white")
    draw = ImageDraw.Draw(grid)
    for row, (label, folder) in enumerate(stage_dirs):
        draw.text((4, row * size + size // 2 - 6), label, fill="black")
        for col, path in enumerate(sorted((folder / "samples").glob("0*.png"))[:per_stage]):
            image = Image.open(path).convert("RGB").resize((size, size))
            grid.paste(image, (label_width + col * size, row * size))
    return grid


def compare(run_names: list[str], experiment: str = "kiln", out: Path | None = None) -> str:
    """Print-ready table of the runs; writes the sample grid to `out` (a .png path) when given."""
    client = MlflowClient()
    rows, stage_dirs = [], []
    for name in run_names:
        run = parent_run(client, experiment, name)
        columns, data = comparison_table(client, run)
        rows.append((name, columns, data))
        run_dir = Path(run.data.tags.get("kiln.run_dir", ""))
        for row in data:
            stage = row[columns.index("stage")]
            stage_dirs.append((f"{name} / {stage}", run_dir / f"eval-{stage}"))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        sample_grid(stage_dirs).save(out)
    return format_table(rows)
