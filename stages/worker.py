"""Multi-process training stages: `launch()` runs a stage under torchrun and returns what rank 0 produced.

The stage task calls `launch()` when the config asks for more than one process (distributed.nproc_per_node x
nnodes) and the stage is data parallel (stages/registry.py: pretrain rungs, sft, dpo, grpo). It writes the
stage's spec (kind, config, inputs, output folder, MLflow run id, rung) to OUT/launch.json and runs

    torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m stages.worker OUT/launch.json

Each process joins the process group, runs the stage's plain `run()`; rank 0 alone logs to the MLflow run and
writes OUT/result.json. On several nodes every node runs that same command (see docs/operations.md, "Multi-GPU and
multi-node"); a node that starts first waits for the spec (KILN_SPEC_WAIT_S, 600 s). A process that fails writes
OUT/.error-rank-R.json so the task re-raises the same kind of error: a permanent one (kiln/errors.py: NaN loss, bad
input, pre-emption) as its class there, which the flow does not retry; anything else as RuntimeError.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kiln import distributed
from kiln.errors import PERMANENT_ERRORS, permanent_class
from kiln.stage_io import StageResult
from stages.registry import STAGES

# The errors a failed process reports that the task raises again as themselves (the rest become RuntimeError).
REPORTED_ERRORS = {error.__name__: error for error in PERMANENT_ERRORS}


def launch(kind: str, cfg, inputs: dict, out_dir: Path, run_id: str | None, rung_index: int | None) -> StageResult:
    if not STAGES[kind].data_parallel:
        raise ValueError(f"{kind}: not a data-parallel stage (stages/registry.py), so it runs in one process")
    out_dir = Path(out_dir)
    spec = out_dir / "launch.json"
    spec.write_text(json.dumps({"kind": kind, "config": cfg.model_dump(mode="json"), "out_dir": str(out_dir),
                                "inputs": {k: str(v) if v is not None else None for k, v in inputs.items()},
                                "run_id": run_id, "rung_index": rung_index}, indent=1))
    for stale in [out_dir / "result.json", *out_dir.glob(".error-rank-*.json")]:
        stale.unlink(missing_ok=True)
    command = distributed.torchrun_command(cfg.distributed, "stages.worker", [str(spec)])
    process = subprocess.Popen(command)
    # SIGTERM to this task goes on to torchrun, which passes it to every process: they checkpoint and stop.
    previous = signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM)) \
        if _in_main_thread() else None
    try:
        code = process.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code != 0:
        errors = [json.loads(f.read_text()) for f in sorted(out_dir.glob(".error-rank-*.json"))]
        # The cause, not its echo: a NaN on rank 0 shows up on rank 1 as a broken connection.
        errors.sort(key=lambda e: e["type"] not in REPORTED_ERRORS)
        if errors:
            raise REPORTED_ERRORS.get(errors[0]["type"], RuntimeError)(errors[0]["message"])
        raise RuntimeError(f"{kind}: torchrun exited with code {code} (the processes' output is above)")
    result = json.loads((out_dir / "result.json").read_text())
    return StageResult(result["stage"], out_dir, result["metrics"], result["content_hash"])


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(spec_path: str) -> None:
    import importlib

    from kiln.config import config_from_dict
    from kiln.tracking import Tracker

    spec_file = Path(spec_path)
    # Other nodes of a multi-node launch may start before node 0's task has written the spec (shared storage).
    deadline = time.monotonic() + float(os.environ.get("KILN_SPEC_WAIT_S", "600"))
    while not spec_file.exists() and time.monotonic() < deadline:
        time.sleep(1)
    spec = json.loads(spec_file.read_text())
    ranks = distributed.init()
    out_dir = Path(spec["out_dir"])
    try:
        cfg = config_from_dict(spec["config"])
        tracker = Tracker(spec["run_id"]) if ranks.is_main else Tracker(None)
        extra = {"rung_index": spec["rung_index"]} if spec["rung_index"] is not None else {}
        result = importlib.import_module(STAGES[spec["kind"]].module).run(cfg, spec["inputs"], out_dir, tracker,
                                                                          **extra)
    except BaseException as exc:
        # A permanent error under its class in kiln/errors.py (a ShardError as ValueError), so launch() re-raises it.
        reported = permanent_class(exc) or type(exc)
        (out_dir / f".error-rank-{ranks.rank}.json").write_text(
            json.dumps({"type": reported.__name__, "message": str(exc)}))
        raise
    if ranks.is_main:
        (out_dir / "result.json").write_text(json.dumps(
            {"stage": result.stage, "metrics": result.metrics, "content_hash": result.content_hash}, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
