"""`kiln compare-systems` at smoke size: every system trains and samples at every step count, and the flow writes
its table, plot, MLflow runs and Prefect artifacts."""

import json
import math
from pathlib import Path

import pytest

from flows.systems import SYSTEMS, check_shared
from kiln.config import load_config

SMOKE = [
    "data.samples_per_resolution=72", "data.max_samples_per_shard=16",
    "vae.base_dim=8", "vae.z_dim=4", "vae.train.steps=2", "vae.train.batch_size=4", "vae.train.crop=32",
    "train.rungs=[{resolution: 32, steps: 3, batch_size: 8}]", "cadence.log_every=1", "cadence.sample_every=100",
    "eval.prompts_per_kind=2", "eval.images_per_prompt=1", "eval.batch_size=8", "features.steps=3",
    "features.dim=8",
]


def test_a_system_that_changes_the_data_is_refused():
    base = load_config("compare-base")
    other = load_config("sd1", ["data.samples_per_resolution=10"])
    with pytest.raises(ValueError, match="system sd1 changes 'data'"):
        check_shared(base, {"sd1": other})


def test_compare_systems_smoke(prefect_harness, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.systems import compare_systems

    monkeypatch.chdir(tmp_path)
    result = compare_systems(steps=[2, 3], overrides=[*SMOKE, f"run_dir={tmp_path / 'runs'}"], run_name="smoke-cmp")
    rows = result["rows"]
    assert [(r["system"], r["steps"]) for r in rows] == [(s, n) for s in SYSTEMS for n in (2, 3)]
    for row in rows:
        assert 0 <= row["heldout verifier score"] <= 1 and 0 <= row["random-caption baseline score"] <= 1
        assert math.isfinite(row["FD (heldout)"]) and row["sampling images/s"] > 0
    assert Path(result["plot"]).stat().st_size > 0
    assert json.loads(Path(result["table"]).with_suffix(".json").read_text())["rows"] == rows

    client = MlflowClient()
    experiment = client.get_experiment_by_name("kiln")
    runs = client.search_runs([experiment.experiment_id], "tags.`kiln.pipeline_run` = 'smoke-cmp'")
    parent = next(r for r in runs if r.data.tags.get("kiln.flow") == "compare-systems")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and "kiln.system" in r.data.tags]
    assert sorted(r.data.tags["kiln.system"] for r in children) == sorted(SYSTEMS)
    history = client.get_metric_history(children[0].info.run_id, "eval/heldout/all/score")
    assert sorted(m.step for m in history) == [2, 3]
    assert {"table.md", "table.json", "accuracy_vs_steps.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    import asyncio

    async def artifact_keys():
        async with get_client() as prefect:
            return {a.key for a in await prefect.read_artifacts()}

    assert {"compare-systems", "compare-systems-table"} <= asyncio.run(artifact_keys())


def test_frechet_distance_is_zero_for_the_same_set_and_the_squared_shift_for_a_moved_one():
    import numpy as np

    from kiln.features import frechet_distance

    a = np.random.default_rng(0).normal(size=(200, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)  # same covariance: |mu shift|^2
    assert frechet_distance(a, 2 * a) > 1.0  # a wider spread is further away
