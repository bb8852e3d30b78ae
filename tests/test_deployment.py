"""The scheduled path end to end: a local `prefect server start`, `prefect deploy --all` from prefect.yaml, a
`process` worker, and a deployment run that executes the pipeline (smoke preset) through that worker. Checked
through Prefect's API (the flow run completed) and MLflow (the pipeline's parent and stage runs exist)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect(*args, env, timeout=300) -> str:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def test_deployment_runs_the_pipeline_through_a_worker(tmp_path, pickapic_parquet):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=api, KILN_HOME=str(REPO),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_CLI_PROMPT="false")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(1)

        _prefect("work-pool", "create", "kiln-local", "--type", "process", env=env)
        _prefect("deploy", "--all", env=env)
        overrides = [f"run_dir={tmp_path / 'runs'}", "experiment=kiln-deployed",
                     f"preference.dataset={pickapic_parquet}"]
        out = _prefect("deployment", "run", "kiln-pipeline/tiny-nightly", "--param", 'preset="smoke"',
                       "--param", f"overrides={json.dumps(overrides)}", "--param", 'run_name="deployed"', env=env)
        flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID:" in line)
        _prefect("worker", "start", "--pool", "kiln-local", "--run-once", env=env, timeout=900)

        deadline = time.monotonic() + 600
        while True:  # the worker waits for the runs it started; this only guards against a slow state write
            with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=10) as response:
                state = json.load(response)["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert state == "COMPLETED", state
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()

    assert (tmp_path / "runs" / "deployed" / "eval-grpo" / "manifest.json").exists()
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("kiln-deployed")
    runs = client.search_runs([experiment.experiment_id], "tags.`kiln.pipeline_run` = 'deployed'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(runs) == 1 + 15  # the parent and one child run per stage of the smoke pipeline
