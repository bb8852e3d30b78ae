"""Training stage: checkpoints hold everything, and a crashed stage resumes to the same weights."""

import pytest
import torch
from safetensors.torch import load_file

from kiln.checkpoint import latest_checkpoint, list_checkpoints
from kiln.config import load_config
from kiln.tracking import Tracker
from stages import pretrain


def _run(cfg, root, out, crash_at=None, monkeypatch=None):
    if crash_at is not None:
        original = pretrain.Trainer.step

        def crashing(self, batch):
            if self.step_count == crash_at:
                raise RuntimeError("simulated crash")
            return original(self, batch)

        monkeypatch.setattr(pretrain.Trainer, "step", crashing)
    inputs = {"latents": str(root / "latents"), "vae": str(root / "vae")}
    return pretrain.run(cfg, inputs, out, Tracker(None), rung_index=0)


def _same_weights(a_dir, b_dir, step):
    for which in ("model", "ema"):
        a = load_file(str(a_dir / "checkpoints" / f"step-{step}" / f"{which}.safetensors"))
        b = load_file(str(b_dir / "checkpoints" / f"step-{step}" / f"{which}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which


def test_crashed_stage_resumes_to_identical_weights(smoke_latents, tmp_path, monkeypatch):
    cfg = load_config("smoke", ["train.rungs.0.steps=8", "cadence.checkpoint_every=3", "cadence.sample_every=100",
                                "cadence.keep_checkpoints=5"])
    _run(cfg, smoke_latents, tmp_path / "straight")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(cfg, smoke_latents, tmp_path / "crashed", crash_at=7, monkeypatch=monkeypatch)
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step-6"
    monkeypatch.undo()
    _run(cfg, smoke_latents, tmp_path / "crashed")  # resumes at step 6
    _same_weights(tmp_path / "straight", tmp_path / "crashed", 8)


def test_checkpoint_contents_and_rotation(smoke_latents, tmp_path):
    cfg = load_config("smoke", ["train.rungs.0.steps=7", "cadence.checkpoint_every=2", "cadence.sample_every=100"])
    _run(cfg, smoke_latents, tmp_path / "out")
    ckpts = list_checkpoints(tmp_path / "out" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-6", "step-7"]  # keep_checkpoints=2
    state = torch.load(ckpts[-1] / "trainer.pt", weights_only=True)
    assert state["step"] == 7 and set(state) >= {"optimizer", "schedule", "position", "generator", "torch_rng"}
    assert state["position"]["batch"] >= 0
    assert not list((tmp_path / "out" / "checkpoints").glob(".tmp-*"))


def test_next_rung_starts_from_previous_weights(smoke_latents, tmp_path):
    cfg = load_config("smoke", ["cadence.sample_every=100"])
    _run(cfg, smoke_latents, tmp_path / "r0")
    trainer = pretrain.Trainer(cfg, 1, smoke_latents / "latents", torch.device("cpu"))
    trainer.init_from(tmp_path / "r0")
    previous = load_file(str(latest_checkpoint(tmp_path / "r0" / "checkpoints") / "ema.safetensors"))
    for key, value in trainer.ema.state_dict().items():
        assert torch.equal(value, previous[key])


@pytest.mark.parametrize("init, expected", [
    # Re-recorded at e38ea81: the synthetic source now renders in the curation workers from per-record seeds.
    ("adaln_zero", [2.51185, 2.60279, 2.36806]),
    ("diffusers", [2.98316, 2.90902, 2.79126]),
])
def test_first_losses_regression(smoke_latents, tmp_path, init, expected):
    """Fixed seed, fixed data: the first losses must not drift silently."""
    cfg = load_config("smoke", ["cadence.sample_every=100", f"train.init={init}"])
    trainer = pretrain.Trainer(cfg, 0, smoke_latents / "latents", torch.device("cpu"))
    batches = trainer.batches()
    losses = [trainer.step(next(batches))["loss"].item() for _ in range(3)]
    trainer2 = pretrain.Trainer(cfg, 0, smoke_latents / "latents", torch.device("cpu"))
    batches2 = trainer2.batches()
    assert losses == [trainer2.step(next(batches2))["loss"].item() for _ in range(3)]
    # Recorded on the CPU build of torch 2.13.0; a change to the objective, sampler of t/noise, data order, model
    # init or VAE training moves these. Update them only for an intended numeric change.
    assert losses == pytest.approx(expected, rel=1e-3)


def test_sigterm_writes_a_checkpoint_and_the_rerun_resumes_identically(smoke_latents, tmp_path, monkeypatch):
    import os
    import signal

    from kiln.preemption import Preempted

    cfg = load_config("smoke", ["train.rungs.0.steps=8", "cadence.checkpoint_every=100", "cadence.sample_every=100"])
    _run(cfg, smoke_latents, tmp_path / "straight")
    original = pretrain.Trainer.step

    def preempted_at_5(self, batch):
        out = original(self, batch)
        if self.step_count == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before it kills the job
        return out

    monkeypatch.setattr(pretrain.Trainer, "step", preempted_at_5)
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 5"):
        _run(cfg, smoke_latents, tmp_path / "preempted")
    assert [p.name for p in list_checkpoints(tmp_path / "preempted" / "checkpoints")] == ["step-5"]
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is only installed while training
    _run(cfg, smoke_latents, tmp_path / "preempted")
    _same_weights(tmp_path / "straight", tmp_path / "preempted", 8)


def test_sigkill_mid_stage_then_rerun_gives_identical_weights(smoke_latents, tmp_path):
    import subprocess
    import sys
    import time

    sets = ["train.rungs.0.steps=40", "cadence.checkpoint_every=10", "cadence.sample_every=1000",
            "cadence.keep_checkpoints=5"]
    cfg = load_config("smoke", sets)
    _run(cfg, smoke_latents, tmp_path / "straight")
    command = [sys.executable, "-m", "stages.pretrain", "--preset", "smoke", *[a for s in sets for a in ("--set", s)],
               "--latents", str(smoke_latents / "latents"), "--vae", str(smoke_latents / "vae"),
               "--out", str(tmp_path / "killed")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_checkpoints(tmp_path / "killed" / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.wait()
    written = [p.name for p in list_checkpoints(tmp_path / "killed" / "checkpoints")]
    assert written and "step-40" not in written, written
    _run(cfg, smoke_latents, tmp_path / "killed")
    _same_weights(tmp_path / "straight", tmp_path / "killed", 40)
