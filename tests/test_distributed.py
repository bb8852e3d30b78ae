"""Data-parallel training on CPU (gloo): a pretrain stage launched with torchrun on 2 processes follows the same loss
trajectory as 1 process with the same global batch, only rank 0 logs to MLflow, a 2-process FSDP2 (sharded)
checkpoint resumes in a 1-process run, and the README's multi-node launch (two torchrun nodes meeting at a c10d
rendezvous) trains as one process does."""

import shutil
import socket
import subprocess

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from kiln import distributed
from kiln.checkpoint import list_checkpoints
from kiln.config import load_config
from kiln.tracking import Tracker
from stages import pretrain
from stages.worker import launch

STEPS = 6
OVERRIDES = [f"train.rungs.0.steps={STEPS}", "cadence.checkpoint_every=4", "cadence.sample_every=100",
             "cadence.log_every=1", "cadence.keep_checkpoints=5", "device=cpu"]


def _config(*extra):
    return load_config("smoke", [*OVERRIDES, *extra])


def _new_run(name):
    client = MlflowClient()
    experiment = client.get_experiment_by_name("kiln-distributed-test") or client.get_experiment(
        client.create_experiment("kiln-distributed-test"))
    return client.create_run(experiment.experiment_id, run_name=name).info.run_id


def _losses(run_id):
    history = MlflowClient().get_metric_history(run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)], [m.step for m in history]


def _inputs(root):
    return {"latents": str(root / "latents"), "vae": str(root / "vae")}


def _assert_close_weights(a_ckpt, b_ckpt, atol=2e-5):
    for which in ("model", "ema"):
        a = load_file(str(a_ckpt / f"{which}.safetensors"))
        b = load_file(str(b_ckpt / f"{which}.safetensors"))
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < atol, f"{which}: largest difference {worst}"


@pytest.fixture(scope="module")
def one_process(smoke_latents, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "pretrain"
    out.mkdir()
    run_id = _new_run("one")
    pretrain.run(_config(), _inputs(smoke_latents), out, Tracker(run_id), rung_index=0)
    return out, _losses(run_id)[0]


def _two_processes(smoke_latents, out, strategy):
    out.mkdir(parents=True)
    cfg = _config("distributed.nproc_per_node=2", f"distributed.strategy={strategy}")
    run_id = _new_run(strategy)
    result = launch("pretrain", cfg, _inputs(smoke_latents), out, run_id, rung_index=0)
    assert result.metrics["steps"] == STEPS
    losses, steps = _losses(run_id)
    assert steps == sorted(set(steps)) and len(steps) == STEPS  # one entry a step: rank 0 alone logs
    return losses


def test_ddp_two_processes_follow_one_process(one_process, smoke_latents, tmp_path):
    one_dir, one_losses = one_process
    losses = _two_processes(smoke_latents, tmp_path / "ddp", "ddp")
    assert losses == pytest.approx(one_losses, rel=1e-4)
    assert len(set(one_losses)) > 1  # the loss moved: a trajectory, not one value
    _assert_close_weights(one_dir / "checkpoints" / f"step-{STEPS}", tmp_path / "ddp" / "checkpoints" / f"step-{STEPS}")


def test_fsdp_sharded_checkpoint_resumes_in_one_process(one_process, smoke_latents, tmp_path):
    one_dir, one_losses = one_process
    fsdp = tmp_path / "fsdp"
    losses = _two_processes(smoke_latents, fsdp, "fsdp")
    assert losses == pytest.approx(one_losses, rel=1e-4)
    middle, final = list_checkpoints(fsdp / "checkpoints")
    # Mid-run checkpoints are shards only (safetensors, one file per rank); the final one also holds whole weights.
    assert len(list((middle / "model").glob("*.safetensors"))) == 2 and not (middle / "model.safetensors").exists()
    assert (final / "model.safetensors").exists()
    _assert_close_weights(one_dir / "checkpoints" / f"step-{STEPS}", final)

    # Lose the last checkpoint: one process resumes from the 2-process shards of step 4 and ends where 1 process did.
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / final.name)
    pretrain.run(_config(), _inputs(smoke_latents), resumed, Tracker(None), rung_index=0)
    _assert_close_weights(one_dir / "checkpoints" / f"step-{STEPS}", resumed / "checkpoints" / f"step-{STEPS}")
    state = torch.load(resumed / "checkpoints" / f"step-{STEPS}" / "trainer.pt", weights_only=True)
    assert state["step"] == STEPS


def test_a_failing_process_fails_the_stage_with_its_own_error(tmp_path):
    out = tmp_path / "broken"
    out.mkdir()
    inputs = {"latents": str(tmp_path / "no-latents"), "vae": str(tmp_path / "no-vae")}
    with pytest.raises(FileNotFoundError, match="no-latents"):  # not retried by Prefect (a permanent error)
        launch("pretrain", _config("distributed.nproc_per_node=2"), inputs, out, None, rung_index=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_follow_one_process(one_process, smoke_latents, tmp_path, monkeypatch):
    """The README's multi-node recipe on one machine: node 0 is the stage task's own launch() (it writes OUT/launch.json
    and runs torchrun), node 1 runs the same torchrun command against that spec; the two agents meet at the c10d
    rendezvous endpoint and each starts one process (world size 2 = 2 nodes x 1)."""
    one_dir, one_losses = one_process
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 processes on a 2-core machine: one thread each
    out = tmp_path / "nodes"
    out.mkdir()
    cfg = _config("distributed.nnodes=2", "distributed.nproc_per_node=1",
                  f"distributed.rdzv_endpoint=127.0.0.1:{_free_port()}", f"distributed.rdzv_id=test-{tmp_path.name}")
    command = distributed.torchrun_command(cfg.distributed, "stages.worker", [str(out / "launch.json")])
    assert {"--nproc-per-node=1", "--nnodes=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={cfg.distributed.rdzv_endpoint}", f"--rdzv-id={cfg.distributed.rdzv_id}"} <= set(command)
    assert "--standalone" not in command
    # Node 1 starts first, before the spec exists: its worker waits for node 0's task to write it (shared storage).
    other_node = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_id = _new_run("two-nodes")
        result = launch("pretrain", cfg, _inputs(smoke_latents), out, run_id, rung_index=0)
        log, _ = other_node.communicate(timeout=120)
    finally:
        if other_node.poll() is None:
            other_node.kill()
            other_node.wait()
    assert other_node.returncode == 0, log[-3000:]
    assert result.metrics["steps"] == STEPS
    losses, steps = _losses(run_id)
    # One entry a step: global rank 0 alone logs (on whichever node the rendezvous gave rank 0).
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert losses == pytest.approx(one_losses, rel=1e-4)  # the same tolerance as 2 processes on one node
    _assert_close_weights(one_dir / "checkpoints" / f"step-{STEPS}", out / "checkpoints" / f"step-{STEPS}")
    assert not list(out.glob(".error-rank-*.json"))
