"""MLflow tracking with explicit run ids (MLflow's active run is thread-local and lost in child processes).

A Tracker is one MLflow run; `Tracker(None)` logs nothing, so stages run without MLflow too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PARENT_TAG = "mlflow.parentRunId"


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class Tracker:
    def __init__(self, run_id: str | None = None):
        self.run_id = run_id
        self.client = _client() if run_id else None

    def __bool__(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: dict) -> None:
        if not self:
            return
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            if self:
                self.client.set_tag(self.run_id, key, str(value))

    def log_image(self, image, key: str, step: int = 0) -> None:
        if self:
            self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict, name: str) -> None:
        if self:
            self.client.log_dict(self.run_id, data, name)

    def log_table(self, rows: list[dict], name: str) -> None:
        if self and rows:
            import pandas as pd

            self.client.log_table(self.run_id, pd.DataFrame(rows), name)

    def log_dataset(self, manifest: dict, shard_dir: Path, name: str) -> None:
        """The shards as an MLflow dataset input of this run: one row per shard (url, samples, sha256), digest the
        manifest's content hash, so a training run can be traced to the exact data."""
        if not self:
            return
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        rows = [{"url": str((Path(shard_dir) / rel).resolve()), "samples": manifest["shard_counts"][rel],
                 "sha256": sha} for rel, sha in sorted(manifest["shards"].items())]
        dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=str(Path(shard_dir).resolve()), name=name,
                                          digest=manifest["content_hash"][:36])
        tags = [InputTag("mlflow.data.context", "curated"), InputTag("kiln.samples", str(manifest["count"]))]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])

    def end(self, status: str = "FINISHED") -> None:
        if self:
            self.client.set_terminated(self.run_id, status)


# MLflow 3's UI opens an experiment on the page its kind names; one with no kind it may open on the GenAI traces
# page. Kiln's runs are model training: "custom_model_development" (the UI's "Machine learning") opens on runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(name: str) -> str:
    """The experiment's id, created if missing; its kind is set to training unless it has one (a kind someone chose
    in the UI is left alone)."""
    client = _client()
    found = client.get_experiment_by_name(name)
    if not found:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in found.tags:  # made before Kiln set the kind, or by someone else
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def start_run(experiment: str, run_name: str, parent_run_id: str | None = None, tags: dict | None = None) -> Tracker:
    """Create a run (nested under parent_run_id when given) and return its Tracker."""
    tags = dict(tags or {})
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = _client().create_run(experiment_id(experiment), run_name=run_name, tags=tags)
    return Tracker(run.info.run_id)


def register_model(name: str, source: str, run_id: str | None, alias: str) -> str:
    """A new version of registered model `name` (created if missing) pointing at `source` (a checkpoint folder),
    produced by run `run_id`, with `alias` set to it. Returns the version. Aliases allow letters, digits, - and _."""
    import re

    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=source, run_id=run_id).version
    client.set_registered_model_alias(name, re.sub(r"[^\w-]", "-", alias), version)
    return version


def tracking_uri() -> str:
    """MLflow's own default (sqlite:///mlflow.db in the working directory) unless MLFLOW_TRACKING_URI is set."""
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()

