"""kiln/trainer.py on a toy regression: the one loop every training stage uses."""

import math
import random

import pytest
import torch
from safetensors.torch import load_file

from kiln.checkpoint import latest_checkpoint, list_checkpoints
from kiln.config import load_config
from kiln.tracking import Tracker
from kiln.trainer import Schedule, Trainer, build_optimizer


class Recorder(Tracker):
    def __init__(self):
        super().__init__(None)
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


def _cfg(*overrides):
    return load_config("smoke", ["cadence.log_every=2", "cadence.checkpoint_every=3", "cadence.keep_checkpoints=10",
                                 *overrides])


def _toy(out_dir, cfg, steps=8, tracker=None, **kwargs):
    """y = x @ w_true from noisy batches drawn with a registered generator; the model learns w."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    generator = torch.Generator().manual_seed(1)
    trainer = Trainer("toy", model, cfg, steps=steps, lr=0.05, schedule=Schedule(warmup=2, total=steps),
                      out_dir=out_dir, tracker=Tracker(None) if tracker is None else tracker, device=torch.device("cpu"),
                      weight_decay=0.01, ema_decay=0.9, state={"generator": generator}, **kwargs)
    w_true = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def batches():
        while True:
            x = torch.randn(16, 4, generator=generator)
            yield x, x @ w_true

    def forward_backward(batch):
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return {"loss": loss.detach(), "images": x.shape[0]}

    return trainer, forward_backward, batches


def test_schedule_reproduces_the_three_shapes_the_stages_used_exactly():
    # Pretrain: linear warm-up, then cosine from the end of the warm-up to 10% of the peak (LambdaLR: peak * factor).
    pretrain = Schedule(warmup=100, total=1500, decay="cosine", floor=0.1)
    for step in (0, 50, 99, 100, 700, 1499, 1600):
        if step < 100:
            factor = (step + 1) / 100
        else:
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 100) / 1400)))
        assert pretrain.lr(1e-3, step) == 1e-3 * factor
    # VAE: warm-up multiplying a cosine that runs from step 0 to zero.
    vae = Schedule(warmup=50, total=1400, decay="cosine", decay_start=0)
    for step in (0, 25, 49, 50, 1000, 1399):
        expected = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * (step / 1400)))
        assert vae.lr(1e-3, step) == pytest.approx(expected, rel=1e-15)
    # DPO / GRPO: warm-up, then constant.
    policy = Schedule(warmup=10, decay="constant")
    assert [policy.lr(2e-5, s) for s in (0, 4, 9, 50)] == [2e-5 * min(1.0, (s + 1) / 10) for s in (0, 4, 9, 50)]


def test_optimizer_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    optimizer, names = build_optimizer(model, 1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert names == ["0.weight", "2.weight", "0.bias", "1.weight", "1.bias", "2.bias"]
    assert [p.ndim for p in decayed["params"]] == [2, 2]


def test_trains_logs_windows_and_keeps_checkpoints(tmp_path):
    recorder = Recorder()
    trainer, forward_backward, batches = _toy(tmp_path, _cfg(), steps=40, tracker=recorder)
    trainer.start()
    trainer.fit(forward_backward, batches)
    losses = [m["train/loss"] for _, m in recorder.logged]
    assert losses[-1] < 0.1 * losses[0]  # it learns the regression
    assert [step for step, _ in recorder.logged] == list(range(2, 41, 2))  # every cadence.log_every steps
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s"} <= set(recorder.logged[0][1])
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "step-40"
    assert trainer.images_per_s > 0


def test_nan_loss_stops_before_the_step_with_a_clear_error(tmp_path):
    trainer, _, batches = _toy(tmp_path, _cfg())
    trainer.start()
    before = [p.detach().clone() for p in trainer.model.parameters()]

    def nan_step(batch):
        loss = trainer.model(batch[0]).sum() * float("nan")
        loss.backward()
        return {"loss": loss.detach()}

    with pytest.raises(FloatingPointError, match="toy: loss is nan at step 0"):
        trainer.fit(nan_step, batches)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_gradients_are_clipped_to_the_configured_norm(tmp_path):
    trainer, _, batches = _toy(tmp_path, _cfg(), grad_clip=1e-3)
    trainer.start()
    seen = []

    def norm_before_step(optimizer, args, kwargs):
        seen.append(torch.sqrt(sum(p.grad.pow(2).sum() for g in optimizer.param_groups for p in g["params"])).item())

    trainer.optimizer.register_step_pre_hook(norm_before_step)

    def big_step(batch):
        loss = 1000 * trainer.model(batch[0]).pow(2).mean()
        loss.backward()
        return {"loss": loss.detach()}

    metrics = trainer.train_step(big_step, next(batches()))
    assert metrics["grad_norm"] > 1  # the norm before clipping
    assert seen and seen[0] == pytest.approx(1e-3, rel=1e-3)


def test_crash_then_resume_gives_identical_weights_ema_and_rng(tmp_path):
    cfg = _cfg()
    straight, fb, batches = _toy(tmp_path / "straight", cfg, steps=8)
    straight.start()
    straight.fit(fb, batches)

    crashed, fb, batches = _toy(tmp_path / "crashed", cfg, steps=8)
    crashed.start()
    original = crashed.train_step

    def crash_at_7(forward_backward, batch):
        if crashed.step == 7:
            raise RuntimeError("simulated crash")
        return original(forward_backward, batch)

    crashed.train_step = crash_at_7
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(fb, batches)
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step-6"

    resumed, fb, batches = _toy(tmp_path / "crashed", cfg, steps=8)
    resumed.start()  # from step-6: weights, EMA, optimizer, generator, torch RNG
    assert resumed.step == 6
    resumed.fit(fb, batches)
    for which in ("model", "ema"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-8" / f"{which}.safetensors"))
        b = load_file(str(tmp_path / "crashed" / "checkpoints" / "step-8" / f"{which}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which


def test_registered_state_round_trips_python_and_torch_rngs(tmp_path):
    rng, position = random.Random(3), {"epoch": 2}

    class Position:
        def state_dict(self):
            return dict(position)

        def load_state_dict(self, state):
            position.update(state)

    trainer, fb, batches = _toy(tmp_path, _cfg(), steps=3)
    trainer.state.update(rng=rng, position=Position())
    trainer.start()
    trainer.fit(fb, batches)
    expected = rng.random()
    position["epoch"] = 99
    again, _, _ = _toy(tmp_path, _cfg(), steps=3)
    rng2 = random.Random(0)
    again.state.update(rng=rng2, position=Position())
    again.start()
    assert rng2.random() == expected and position["epoch"] == 2
