"""End to end: the whole pipeline on the smoke preset under Prefect, checked through MLflow; plus the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

STAGES = ["data", "vae", "latents", "pretrain-32", "eval-pretrain-32", "pretrain-64", "eval-pretrain-64",
          "sft", "eval-sft", "preference", "reward", "dpo", "eval-dpo", "grpo", "eval-grpo"]


@pytest.fixture(scope="module")
def smoke_run(prefect_harness, tmp_path_factory, pickapic_parquet):
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("runs")
    # A smoke model draws nothing the verifier can tell apart, so its preference pairs come from a labelled dataset.
    overrides = [f"run_dir={root}", "experiment=kiln-e2e", f"preference.dataset={pickapic_parquet}"]
    outputs = pipeline(preset="smoke", overrides=overrides, run_name="e2e")
    return root, outputs, overrides


def test_every_stage_writes_its_output(smoke_run):
    from kiln.config import load_config
    from stages.registry import STAGES as SPECS
    from stages.registry import pipeline_plan

    root, outputs, overrides = smoke_run
    assert list(outputs) == STAGES
    kinds = {stage.name: stage.kind for stage in pipeline_plan(load_config("smoke", overrides))}
    for name in STAGES:
        manifest = json.loads((root / "e2e" / name / "manifest.json").read_text())
        assert manifest["stage"] == name and manifest["cache_key"] and manifest["content_hash"]
        # What a rerun checks before reusing the output: the registry hashes it as the stage did.
        assert SPECS[kinds[name]].output_hash(root / "e2e" / name) == manifest["content_hash"], name
    assert (root / "e2e" / "data" / "shards" / "manifest.json").exists()
    assert list((root / "e2e" / "pretrain-64" / "checkpoints").glob("step-4/model.safetensors"))
    assert (root / "e2e" / "eval-pretrain-64" / "samples" / "grid.png").exists()


def test_mlflow_parent_and_children(smoke_run):
    client = MlflowClient()
    exp = client.get_experiment_by_name("kiln-e2e")
    runs = client.search_runs([exp.experiment_id], "tags.`kiln.pipeline_run` = 'e2e'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["kiln.stage"] for r in children) == sorted(STAGES)
    assert parents[0].data.params["model.num_layers"] == "1"  # the full resolved config
    by_stage = {r.data.tags["kiln.stage"]: r for r in children}
    pretrain = by_stage["pretrain-64"]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s"):
        assert key in pretrain.data.metrics, key
    assert any(k.startswith("train/loss_t") for k in pretrain.data.metrics)
    assert "kiln.checkpoint" in pretrain.data.tags
    assert "vae/psnr" in by_stage["vae"].data.metrics
    evaluation = by_stage["eval-pretrain-64"]
    assert "eval/heldout/single/colour_shape" in evaluation.data.metrics
    artifacts = [a.path for a in client.list_artifacts(evaluation.info.run_id)]
    assert "verifier_table.json" in artifacts
    for stage in ("sft", "dpo", "grpo"):
        assert "eval/heldout/single/colour_shape" in by_stage[f"eval-{stage}"].data.metrics
    assert "reward/val_accuracy" in by_stage["reward"].data.metrics
    assert "preference/pairs" in by_stage["preference"].data.metrics
    assert {"train/kl", "train/reward"} <= set(by_stage["grpo"].data.metrics)
    parent_artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id)]
    assert "stage_comparison.json" in parent_artifacts
    table = json.loads(Path(client.download_artifacts(parents[0].info.run_id, "stage_comparison.json")).read_text())
    stages = [row[table["columns"].index("stage")] for row in table["data"]]
    assert stages == ["pretrain-32", "pretrain-64", "sft", "dpo", "grpo"]
    images = [a.path for a in client.list_artifacts(pretrain.info.run_id, "images")]
    assert images, "sample grids logged during training"
    registered = client.get_model_version_by_alias("kiln-e2e-smoke", "e2e")  # the final model, aliased by run name
    assert registered.run_id == by_stage["grpo"].info.run_id and "/e2e/grpo/checkpoints/step-" in registered.source
    assert parents[0].data.tags["kiln.registered_model"] == f"kiln-e2e-smoke/{registered.version}"


def test_rerun_skips_finished_stages(smoke_run, prefect_harness):
    from flows.pipeline import pipeline

    root, _, overrides = smoke_run
    before = {p: p.stat().st_mtime for p in (root / "e2e").glob("*/manifest.json")}
    pipeline(preset="smoke", overrides=overrides, run_name="e2e")
    after = {p: p.stat().st_mtime for p in (root / "e2e").glob("*/manifest.json")}
    assert before == after


def test_a_damaged_output_is_rerun_and_the_stages_after_it_reused(smoke_run, prefect_harness):
    """A latents shard truncated by hand after its stage finished: the rerun notices (the shard no longer hashes to
    the manifest's content hash) and encodes the latents again; they come out the same, so nothing after reruns."""
    from flows.pipeline import pipeline

    root, _, overrides = smoke_run
    latents = root / "e2e" / "latents"
    before = {p.parent.name: p.stat().st_mtime for p in (root / "e2e").glob("*/manifest.json")}
    old_hash = json.loads((latents / "manifest.json").read_text())["content_hash"]
    shard = next((latents / "shards").glob("*/shard-*.tar"))
    shard.write_bytes(shard.read_bytes()[:1024])
    pipeline(preset="smoke", overrides=overrides, run_name="e2e")
    after = {p.parent.name: p.stat().st_mtime for p in (root / "e2e").glob("*/manifest.json")}
    assert [name for name in STAGES if after[name] != before[name]] == ["latents"]
    assert json.loads((latents / "manifest.json").read_text())["content_hash"] == old_hash


def test_generate_cli_writes_pngs(smoke_run, tmp_path):
    root, outputs, _ = smoke_run
    out = tmp_path / "png"
    result = subprocess.run(
        [sys.executable, "-m", "kiln_cli", "generate", "--from", outputs["pretrain-64"], "--prompt", "a red circle",
         "--n", "2", "--steps", "2", "--width", "48", "--height", "64", "--out", str(out)],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (48, 64)


def _kiln(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kiln_cli", *args], capture_output=True, text=True, cwd=cwd)


def test_bad_config_is_one_line_and_runs_nothing(tmp_path):
    result = _kiln("run", "--preset", "smoke", "--set", "model.num_layerz=2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["kiln: error: config: unknown key 'model.num_layerz'"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_checkpoint_is_one_line(tmp_path):
    result = _kiln("generate", "--from", str(tmp_path / "nowhere"), "--prompt", "a red circle", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"kiln: error: checkpoint: {tmp_path / 'nowhere'} does not exist"]


def test_empty_data_folder_is_one_line_and_keeps_outputs(smoke_run, tmp_path):
    """A training stage pointed at an empty data folder fails clearly and leaves existing checkpoints alone."""
    from kiln.config import load_config
    from kiln.tracking import Tracker
    from stages import pretrain

    root, outputs, _ = smoke_run
    empty = tmp_path / "empty"
    empty.mkdir()
    stage_out = Path(outputs["pretrain-64"])
    before = sorted(p.name for p in (stage_out / "checkpoints").iterdir())
    with pytest.raises(FileNotFoundError) as err:
        pretrain.run(load_config("smoke"), {"latents": str(empty), "vae": outputs["vae"]}, stage_out, Tracker(None), 1)
    assert "no shard manifest" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in (stage_out / "checkpoints").iterdir()) == before


def test_force_from_and_only_pick_the_stages_that_run(smoke_run, prefect_harness):
    from flows.pipeline import pipeline, stage_modes
    from kiln.config import load_config

    root, _, overrides = smoke_run
    cfg = load_config("smoke", overrides)
    modes = stage_modes(cfg, from_stage="dpo")
    assert [n for n, m in modes.items() if m == "force"] == ["dpo", "eval-dpo", "grpo", "eval-grpo"]
    assert set(stage_modes(cfg, force=["vae"]).values()) == {"auto", "force"}
    with pytest.raises(ValueError, match="--only: no stage ddpo in this pipeline"):
        stage_modes(cfg, only=["ddpo"])

    def stamps():
        return {p.parent.name: p.stat().st_mtime for p in (root / "e2e").glob("*/manifest.json")}

    before = stamps()
    pipeline(preset="smoke", overrides=overrides, run_name="e2e", only=["eval-dpo"])
    after = stamps()
    assert [name for name in STAGES if after[name] != before[name]] == ["eval-dpo"]
    pipeline(preset="smoke", overrides=overrides, run_name="e2e", force=["eval-sft"])
    assert [name for name in STAGES if stamps()[name] != after[name]] == ["eval-sft"]


def test_only_without_earlier_outputs_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kiln_cli", "run", "--preset", "smoke", "--set", f"run_dir={tmp_path}",
         "--run-name", "empty", "--only", "eval-dpo"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"kiln: error: --only: stage data has no finished output in {tmp_path / 'empty' / 'data'} to reuse; run it first"]


def test_gpu_slot_keeps_two_stages_off_one_gpu(prefect_harness):
    """With a 1-slot global concurrency limit, two stages that want the GPU at once run one after the other: the
    server counts the holder's slot, and the second stage gets in only after the first has left. Checked by the order
    of events, not by timings: a broken limit shows as the second stage entering while the first holds the slot."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.pipeline import gpu_slot

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="test-gpu", limit=1))
    events, lock = [], threading.Lock()
    first_in, second_asking, second_in = threading.Event(), threading.Event(), threading.Event()
    held = []

    def record(event):
        with lock:
            events.append(event)

    def first():
        with gpu_slot("test-gpu"):
            record("first in")
            with get_client(sync_client=True) as client:
                held.append(client.read_global_concurrency_limit_by_name("test-gpu").active_slots)
            first_in.set()
            second_asking.wait(timeout=120)
            # Hold the slot a while: a limit that let the second stage in would let it in now (a wait for an event
            # that must not happen; nothing is asserted on how long anything took).
            second_in.wait(timeout=2)
            record("first out")

    def second():
        first_in.wait(timeout=120)
        second_asking.set()
        with gpu_slot("test-gpu"):
            record("second in")
            second_in.set()
        record("second out")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert held == [1]  # the server counts the first stage's slot
    assert events == ["first in", "first out", "second in", "second out"]
    with gpu_slot("no-such-limit"):  # an undefined limit limits nothing
        pass


def test_transient_failures_are_retried_and_real_ones_fail_once(prefect_harness, smoke_config, tmp_path,
                                                                   monkeypatch):
    import types

    import flows.pipeline as pipeline_module
    from kiln.stage_io import StageResult

    calls = []

    def make_stage(error):
        def run(cfg, inputs, out_dir, tracker):
            calls.append(error)
            if len(calls) == 1:
                raise error
            return StageResult("vae", out_dir, {}, "hash")
        return types.SimpleNamespace(run=run)

    task = pipeline_module.stage_task.with_options(retry_delay_seconds=0)
    common = dict(cfg_tree=smoke_config.model_dump(mode="json"), inputs={}, parent_run_id=None)
    monkeypatch.setattr(pipeline_module, "stage_module", lambda kind: make_stage(OSError("disk hiccup")))
    assert task("vae", "vae", run_root=str(tmp_path / "a"), **common) == str(tmp_path / "a" / "vae")
    assert len(calls) == 2  # failed once, retried, finished

    calls.clear()
    monkeypatch.setattr(pipeline_module, "stage_module",
                        lambda kind: make_stage(FloatingPointError("vae: loss is nan at step 3")))
    with pytest.raises(FloatingPointError, match="loss is nan"):
        task("vae", "vae", run_root=str(tmp_path / "b"), **common)
    assert len(calls) == 1  # not retried


def test_compare_prints_the_stage_table_and_writes_a_grid(smoke_run, tmp_path):
    from PIL import Image

    from flows.compare import compare

    table = compare(["e2e", "e2e"], experiment="kiln-e2e", out=tmp_path / "grid.png")
    lines = table.splitlines()
    assert lines[0].startswith("| run | stage | heldout single colour+shape |")
    stages = [line.split("|")[2].strip() for line in lines[2:]]
    assert stages == ["pretrain-32", "pretrain-64", "sft", "dpo", "grpo"] * 2
    assert Image.open(tmp_path / "grid.png").size[1] == 10 * 96  # one row per run and evaluated stage
    with pytest.raises(ValueError, match="no finished pipeline run named 'nope'"):
        compare(["nope"], experiment="kiln-e2e")


def test_rerun_moves_the_old_output_aside_and_trains_on_two_processes(smoke_run, prefect_harness):
    """A rerun of a finished training stage starts afresh (its old output moved to .superseded, not resumed from
    its final checkpoint), here as 2 torchrun processes (gloo) under the flow, with rank 0 alone logging to MLflow."""
    from flows.pipeline import pipeline

    root, _, overrides = smoke_run
    old_manifest = json.loads((root / "e2e" / "sft" / "manifest.json").read_text())
    pipeline(preset="smoke", overrides=[*overrides, "distributed.nproc_per_node=2"], run_name="e2e", only=["sft"])
    moved = list((root / "e2e" / ".superseded").glob("sft-*"))
    assert len(moved) == 1 and json.loads((moved[0] / "manifest.json").read_text()) == old_manifest
    sft = root / "e2e" / "sft"
    assert json.loads((sft / "launch.json").read_text())["config"]["distributed"]["nproc_per_node"] == 2
    manifest = json.loads((sft / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 3 and manifest["mlflow_run_id"] != old_manifest["mlflow_run_id"]
    history = MlflowClient().get_metric_history(manifest["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == [2, 3]  # smoke: log_every 2, 3 steps; one entry each (rank 0)


def test_finetune_pipeline_from_an_export_trains_lora_stages_whose_adapter_loads_in_diffusers(smoke_run, tmp_path):
    """A released checkpoint's path through Kiln, offline: the smoke pipeline's export is the released model; a second
    pipeline starts from it with LoRA on its one rung, SFT, DPO and GRPO; the final stage exports as that base plus
    one diffusers LoRA file, which QwenImagePipeline.load_lora_weights applies to draw what Kiln draws."""
    import numpy as np

    from conftest import draw_with_diffusers
    from flows.pipeline import pipeline
    from kiln.generate import to_pil
    from kiln.vae import vae_for
    from stages.sampling import generate_for_captions, load_stage

    root, outputs, overrides = smoke_run
    released = tmp_path / "released"
    result = subprocess.run([sys.executable, "-m", "kiln_cli", "export", "--from", outputs["pretrain-64"],
                             "--out", str(released)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    finetune = [*overrides, f"run_dir={tmp_path}", f"model.pretrained={released}", f"vae.pretrained={released}",
                "vae.subfolder=vae", "train.rungs=[{resolution: 64, steps: 3, batch_size: 8}]",
                "lora.stages=[pretrain-64,sft,dpo,grpo]", "lora.rank=2", "lora.alpha=2"]
    bad = subprocess.run([sys.executable, "-m", "kiln_cli", "run", "--preset", "smoke", "--run-name", "bad",
                          *[a for s in [*finetune, "model.num_layers=2"] for a in ("--set", s)]],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "model.pretrained" in bad.stderr and "missing" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad" / "data").exists()  # nothing ran
    tuned = pipeline(preset="smoke", overrides=finetune, run_name="ft")
    assert list(tuned) == ["data", "vae", "latents", "pretrain-64", "eval-pretrain-64", "sft", "eval-sft",
                           "preference", "reward", "dpo", "eval-dpo", "grpo", "eval-grpo"]
    for stage in ("pretrain-64", "sft", "dpo", "grpo"):
        meta = json.loads(next(Path(tuned[stage]).glob("checkpoints/step-*/meta.json")).read_text())
        assert meta["kind"] == "lora", stage

    exported = tmp_path / "exported"
    result = subprocess.run([sys.executable, "-m", "kiln_cli", "export", "--from", tuned["grpo"], "--out",
                             str(exported)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lora = json.loads((exported / "kiln.json").read_text())["lora"]
    assert lora["rank"] == 8 and Path(lora["base"]).resolve() == (released / "transformer").resolve()
    captions = ["a red circle", "two blue squares"]
    _, theirs = draw_with_diffusers(exported, captions, 64, lora=True)
    stage_cfg, model, vae_dir, _ = load_stage(Path(tuned["grpo"]))
    ours = generate_for_captions(stage_cfg, model, vae_for(stage_cfg, vae_dir, "cpu"), captions, width=64,
                                 height=64, steps=5, cfg_scale=4.0, seed=3)
    for a, b in zip(ours, to_pil(theirs * 2 - 1)):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
