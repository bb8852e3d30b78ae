"""LoRA stages (kiln/adapters.py, the trainer's lora mode) and pretrained initialisation (kiln/weights.py), on the
smoke preset as plain functions."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kiln.adapters import BaseModel, attach_lora, fuse_adapter, trainable
from kiln.checkpoint import latest_checkpoint, load_trainer_state
from kiln.config import ConfigError, load_config
from kiln.models import build_backbone, predict
from kiln.tracking import Tracker
from kiln.weights import load_generator
from stages import dpo, grpo, pretrain, sft
from stages.common import run_without_orchestration
from conftest import draw_with_diffusers


def _cfg(*overrides):
    return load_config("smoke", ["cadence.sample_every=100", "lora.rank=4", "lora.alpha=8", *overrides])


@pytest.fixture(scope="module")
def base(smoke_latents, tmp_path_factory):
    """A finished smoke pretrain rung: the weights every LoRA stage here starts from."""
    root = tmp_path_factory.mktemp("lora-base")
    inputs = {"latents": smoke_latents / "latents", "vae": smoke_latents / "vae"}
    run_without_orchestration([("pretrain", "pretrain", inputs)], _cfg(), root)
    return root / "pretrain", smoke_latents


def _backbone(cfg):
    return build_backbone(cfg.model, cfg.vae.z_dim, cfg.text_encoder.dim)


def _same_files(a_dir, b_dir):
    for which in ("model", "ema"):
        if not (latest_checkpoint(a_dir / "checkpoints") / f"{which}.safetensors").exists():
            continue  # the policy stages keep no EMA
        a = load_file(str(latest_checkpoint(a_dir / "checkpoints") / f"{which}.safetensors"))
        b = load_file(str(latest_checkpoint(b_dir / "checkpoints") / f"{which}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which


def _crash_resume_and_compare(run, step, crash_at, monkeypatch, tmp_path):
    """run(out) crashes at `step` into tmp_path/crashed, is rerun there, and must end where tmp_path/straight did."""
    crash_at(step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed")
    monkeypatch.undo()
    run(tmp_path / "crashed")
    _same_files(tmp_path / "straight", tmp_path / "crashed")


def test_bad_lora_settings_are_one_line_errors_before_compute():
    with pytest.raises(ConfigError, match=r"'to_nothing' names no Linear layer .*attn\.to_q"):
        _cfg("lora.stages=[sft]", "lora.target_modules=[to_nothing]")
    with pytest.raises(ConfigError, match=r"lora.rank 64 does not fit .*at most 32"):
        _cfg("lora.stages=[sft]", "lora.rank=64")
    with pytest.raises(ConfigError, match=r"lora.stages: \['pretrain-128'\] are not generator stages of this config"):
        _cfg("lora.stages=[pretrain-128]")


def test_an_adapter_starts_at_its_base_and_fuses_to_what_it_computes():
    cfg = _cfg("lora.stages=[sft]")
    torch.manual_seed(0)
    model = _backbone(cfg).eval()
    plain = _backbone(cfg).eval()
    plain.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 16, 16), torch.rand(2)
    text, mask = torch.randn(2, 5, cfg.text_encoder.dim), torch.ones(2, 5, dtype=torch.bool)
    attach_lora(model, cfg.lora)
    assert all("lora_" in name for name in trainable(model))
    with torch.no_grad():
        assert torch.equal(predict(model, x, t, text, mask, (4, 4)), predict(plain, x, t, text, mask, (4, 4)))
        for name, param in trainable(model).items():  # a trained adapter: B no longer zero
            param.normal_(std=0.1)
        adapted = predict(model, x, t, text, mask, (4, 4))
        reference = predict(BaseModel(model), x, t, text, mask, (4, 4))  # the adapter switched off
        fused = fuse_adapter(plain, cfg.lora, {k: v.detach() for k, v in trainable(model).items()})
        assert (adapted - reference).abs().max() > 1e-3
        assert torch.equal(reference, predict(_backbone_with(cfg, model), x, t, text, mask, (4, 4)))
        assert torch.allclose(predict(fused, x, t, text, mask, (4, 4)), adapted, atol=1e-5)


def _backbone_with(cfg, adapted):
    """A plain backbone holding an adapted model's base weights."""
    plain = _backbone(cfg).eval()
    base = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(base)
    return plain


def test_lora_sft_checkpoints_the_adapter_only_and_later_stages_read_full_weights(base, tmp_path):
    base_dir, latents = base
    cfg = _cfg("lora.stages=[sft]", "sft.centre_margin=0", "sft.min_gap=0", "sft.steps=3", "sft.lr=0.01")
    inputs = {"latents": latents / "latents", "vae": latents / "vae", "init": base_dir}
    sft.run(cfg, inputs, tmp_path / "sft", Tracker(None))
    ckpt = latest_checkpoint(tmp_path / "sft" / "checkpoints")
    for which in ("model", "ema"):
        assert all(".lora_A." in k or ".lora_B." in k for k in load_file(str(ckpt / f"{which}.safetensors")))
    adapter = load_file(str(ckpt / "model.safetensors"))
    optimizer = load_trainer_state(ckpt)["optimizer"]
    # The optimizer holds the adapter only (the last block's text-side layers get no gradient, hence no moments).
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(adapter) >= len(optimizer["state"]) > 0
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["kind"] == "lora" and meta["lora"]["rank"] == 4 and meta["base"]["which"] == "ema"

    full, before = _backbone(cfg), _backbone(cfg)
    load_generator(tmp_path / "sft", full)
    load_generator(base_dir, before)
    changed = {k for k, v in full.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all(k.rsplit(".", 1)[0].endswith(tuple(cfg.lora.target_modules)) for k in changed)
    assert not meta["base"]["path"].startswith("/")  # relative to the checkpoint: a moved run folder resolves
    assert (ckpt / meta["base"]["path"]).resolve() == base_dir.resolve()


def test_lora_sft_resumes_after_a_crash_to_identical_adapters(base, tmp_path, monkeypatch, crash_at):
    base_dir, latents = base
    cfg = _cfg("lora.stages=[sft]", "sft.centre_margin=0", "sft.min_gap=0", "sft.steps=4",
               "cadence.checkpoint_every=2", "cadence.keep_checkpoints=5")
    inputs = {"latents": latents / "latents", "vae": latents / "vae", "init": base_dir}
    sft.run(cfg, inputs, tmp_path / "straight", Tracker(None))
    _crash_resume_and_compare(lambda out: sft.run(cfg, inputs, out, Tracker(None)), 3, crash_at, monkeypatch, tmp_path)


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_lora_policy_stages_start_at_their_reference_and_resume_exactly(stage, base, pickapic_parquet, tmp_path,
                                                                        monkeypatch, crash_at):
    base_dir, latents = base
    module = {"dpo": dpo, "grpo": grpo}[stage]
    cfg = _cfg(f"lora.stages=[{stage}]", "cadence.log_every=1", "cadence.checkpoint_every=2", "cadence.keep_checkpoints=5",
               "dpo.max_steps=4", "grpo.max_steps=3", "grpo.reward=verifier", "dpo.learning_rate=0.01",
               f"preference.dataset={pickapic_parquet}")
    inputs = {"init": base_dir, "vae": latents / "vae"}
    if stage == "dpo":
        run_without_orchestration([("preference", "preference", {"model": base_dir, "vae": latents / "vae"})], cfg,
                                  tmp_path)
        inputs["pairs"] = tmp_path / "preference"

    class FirstStep(Tracker):
        def __init__(self):
            super().__init__(None)
            self.first = None

        def log_metrics(self, metrics, step=None):
            if step == 1 and self.first is None:
                self.first = dict(metrics)

    tracker = FirstStep()
    module.run(cfg, inputs, tmp_path / "straight", tracker)
    if stage == "dpo":  # the policy starts as its reference (adapter B = 0): every implicit reward is 0
        assert tracker.first["train/rewards/margins"] == 0.0
    else:
        assert tracker.first["train/kl"] == 0.0 and tracker.first["train/ratio_dev"] == 0.0
    _crash_resume_and_compare(lambda out: module.run(cfg, inputs, out, Tracker(None)), 2, crash_at, monkeypatch,
                              tmp_path)


def test_sigkill_mid_lora_rung_then_rerun_gives_identical_adapters(base, tmp_path):
    import subprocess
    import sys
    import time

    from kiln.checkpoint import list_checkpoints

    base_dir, latents = base
    sets = ["lora.stages=[pretrain-64]", "lora.rank=4", "train.rungs.1.steps=30", "cadence.checkpoint_every=10",
            "cadence.sample_every=1000", "cadence.keep_checkpoints=5"]
    cfg = load_config("smoke", sets)
    inputs = {"latents": latents / "latents", "vae": latents / "vae", "init": base_dir}
    pretrain.run(cfg, inputs, tmp_path / "straight", Tracker(None), rung_index=1)
    command = [sys.executable, "-m", "stages.pretrain", "--preset", "smoke", *[a for s in sets for a in ("--set", s)],
               "--rung", "1", "--latents", str(latents / "latents"), "--vae", str(latents / "vae"),
               "--init", str(base_dir), "--out", str(tmp_path / "killed")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_checkpoints(tmp_path / "killed" / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    written = [p.name for p in list_checkpoints(tmp_path / "killed" / "checkpoints")]
    assert written and "step-30" not in written, written
    pretrain.run(cfg, inputs, tmp_path / "killed", Tracker(None), rung_index=1)
    _same_files(tmp_path / "straight", tmp_path / "killed")


def test_exported_lora_chain_loads_in_diffusers_and_draws_what_kiln_draws(base, pickapic_parquet, tmp_path):
    """LoRA SFT then LoRA DPO (lr high enough that each adapter matters): the DPO stage exports as its base pipeline
    plus one diffusers LoRA file of rank 4 + 4, or merged; both draw Kiln's images within one pixel level."""
    import numpy as np

    from kiln.generate import to_pil
    from kiln.vae import vae_for
    from stages.export import export_diffusers
    from stages.sampling import generate_for_captions, load_stage

    base_dir, latents = base
    # img_mod.1 and proj_out as well: the smoke model's attention is gated near zero (adaLN-Zero, 6 steps), so
    # adapters on attention alone would barely move the images.
    cfg = _cfg("lora.stages=[sft,dpo]", "lora.target_modules=[to_q,to_v,to_out.0,img_mod.1,proj_out]",
               "sft.centre_margin=0", "sft.min_gap=0", "sft.steps=3", "sft.lr=0.05",
               "dpo.max_steps=3", "dpo.learning_rate=0.05", f"preference.dataset={pickapic_parquet}")
    run_without_orchestration([
        ("sft", "sft", {"latents": latents / "latents", "vae": latents / "vae", "init": base_dir}),
        ("preference", "preference", {"model": tmp_path / "sft", "vae": latents / "vae"}),
        ("dpo", "dpo", {"pairs": tmp_path / "preference", "init": tmp_path / "sft", "vae": latents / "vae"}),
    ], cfg, tmp_path)
    captions = ["a red circle", "two blue squares"]
    stage_cfg, model, vae_dir, _ = load_stage(tmp_path / "dpo")
    ours = generate_for_captions(stage_cfg, model, vae_for(stage_cfg, vae_dir, "cpu"), captions, width=64,
                                 height=64, steps=5, cfg_scale=4.0, seed=3)
    adapter_out = export_diffusers(tmp_path / "dpo", tmp_path / "adapter")
    meta = json.loads((adapter_out / "kiln.json").read_text())["lora"]
    assert meta["rank"] == 8 and meta["stages"] == 2 and (adapter_out / meta["file"]).exists()
    merged_out = export_diffusers(tmp_path / "dpo", tmp_path / "merged", merge=True)
    assert not (merged_out / "pytorch_lora_weights.safetensors").exists()
    base_pipe, _ = draw_with_diffusers(adapter_out, captions, 64)
    x, t = torch.randn(2, 16, 16), torch.rand(2)
    text, mask = torch.randn(2, 5, cfg.text_encoder.dim), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        kiln_velocity = predict(model, x, t, text, mask, (4, 4))
        # The smoke VAE barely depends on its latents, so the adapter's effect is checked on the velocity.
        assert (predict(base_pipe.transformer, x, t, text, mask, (4, 4)) - kiln_velocity).abs().max() > 1e-2
    for folder, lora in ((adapter_out, True), (merged_out, False)):
        pipe, theirs = draw_with_diffusers(folder, captions, 64, lora)
        for a, b in zip(ours, to_pil(theirs * 2 - 1)):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
        with torch.no_grad():
            assert torch.allclose(predict(pipe.transformer, x, t, text, mask, (4, 4)), kiln_velocity, atol=1e-5)


def test_lora_rung_on_two_fsdp_processes_follows_one_process_and_resumes_in_one(base, tmp_path):
    """FSDP2 with an adapter: base and adapter sharded, the adapter's EMA sharded like it, checkpoints hold adapter
    shards (whole adapter at the end), the end-of-stage sample gathers the EMA adapter; one process resumes the
    2-process shards and ends where one process ends."""
    from kiln.checkpoint import list_checkpoints
    from stages.worker import launch

    base_dir, latents = base
    sets = ["lora.stages=[pretrain-64]", "lora.rank=4", "lora.alpha=8", "train.rungs.1.steps=4",
            "cadence.checkpoint_every=2", "cadence.keep_checkpoints=5", "cadence.sample_every=4", "device=cpu"]
    inputs = {"latents": str(latents / "latents"), "vae": str(latents / "vae"), "init": str(base_dir)}
    pretrain.run(load_config("smoke", sets), inputs, tmp_path / "one", Tracker(None), rung_index=1)
    (tmp_path / "fsdp").mkdir()
    launch("pretrain", load_config("smoke", [*sets, "distributed.nproc_per_node=2", "distributed.strategy=fsdp"]),
           inputs, tmp_path / "fsdp", None, rung_index=1)
    middle, final = list_checkpoints(tmp_path / "fsdp" / "checkpoints")
    assert len(list((middle / "model").glob("*.safetensors"))) == 2  # adapter shards, one file per rank
    assert (tmp_path / "fsdp" / "samples" / "step-4.png").exists()  # drawn from the gathered EMA adapter

    def close(a_dir, b_ckpt):
        for which in ("model", "ema"):
            a = load_file(str(latest_checkpoint(a_dir / "checkpoints") / f"{which}.safetensors"))
            b = load_file(str(b_ckpt / f"{which}.safetensors"))
            assert a.keys() == b.keys() and all(".lora_" in k for k in a)
            assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-5, which

    close(tmp_path / "one", final)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoints" / final.name)
    pretrain.run(load_config("smoke", sets), inputs, resumed, Tracker(None), rung_index=1)
    close(tmp_path / "one", latest_checkpoint(resumed / "checkpoints"))


def test_a_missing_pretrained_folder_is_one_line(tmp_path):
    from kiln.weights import check_pretrained

    with pytest.raises(FileNotFoundError, match=r"model.pretrained: .*missing does not exist"):
        check_pretrained(load_config("smoke", [f"model.pretrained={tmp_path / 'missing'}"]))
    (tmp_path / "empty" / "transformer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model.safetensors .*pretrained_subfolder"):
        check_pretrained(load_config("smoke", [f"model.pretrained={tmp_path / 'empty'}"]))
