"""A finished stage output whose files changed since its stage wrote the manifest (a checkpoint or a shard
truncated by hand) is noticed before reuse: the stage reruns, saying why in one line, or under --only, which runs
nothing else, fails with that reason. Stage task called as a plain function (no Prefect), with stand-in stages."""

import types
from pathlib import Path

import numpy as np
import pytest

import flows.pipeline as pipeline_module
from data.shards import ShardWriter
from kiln.stage_io import StageResult, hash_files, read_stage_manifest
from stages.registry import STAGES


def write_checkpoint(out_dir: Path) -> str:
    step = out_dir / "checkpoints" / "step-1"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    return hash_files(out_dir / "checkpoints")


def write_shards(out_dir: Path) -> str:
    with ShardWriter(out_dir / "shards", max_samples_per_shard=2) as writer:
        for i in range(3):
            writer.write(bucket=(8, 8), key=f"s{i}", caption="a red circle", tensors={"latents": np.full((4, 1, 1), i)})
    return writer.close()["content_hash"]


@pytest.fixture
def run_stage(smoke_config, tmp_path, monkeypatch):
    """run_stage(kind, mode="auto") runs a stand-in `kind` stage that writes with its writer, through stage_task;
    returns how many times the stand-in ran so far."""
    runs = []
    writers = {"vae": write_checkpoint, "latents": write_shards}

    def stage_module(kind):
        def run(cfg, inputs, out_dir, tracker):
            runs.append(kind)
            return StageResult(kind, out_dir, {}, writers[kind](Path(out_dir)))
        return types.SimpleNamespace(run=run)

    monkeypatch.setattr(pipeline_module, "stage_module", stage_module)
    tree = {**smoke_config.model_dump(mode="json"), "gpu_concurrency_limit": None}

    def run_stage(kind, mode="auto"):
        pipeline_module.stage_task.fn(kind, kind, cfg_tree=tree, inputs={}, run_root=str(tmp_path), parent_run_id=None,
                                      modes={kind: mode})
        return len(runs)

    return run_stage


def test_a_truncated_checkpoint_reruns_its_stage(run_stage, tmp_path, capsys):
    out = tmp_path / "vae"
    assert run_stage("vae") == 1
    recorded = read_stage_manifest(out)["content_hash"]
    assert STAGES["vae"].output_hash(out) == recorded  # the registry hashes what the stage reported
    assert run_stage("vae") == 1  # intact: reused
    capsys.readouterr()
    weights = out / "checkpoints" / "step-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    found = hash_files(out / "checkpoints")
    assert run_stage("vae") == 2
    moved = next((tmp_path / ".superseded").glob("vae-*"))
    assert capsys.readouterr().out.splitlines() == [
        f"vae: rerunning, its finished output changed since it finished (content hash {found[:12]}, "
        f"manifest {recorded[:12]})",
        f"vae: previous output moved to {moved}"]
    assert read_stage_manifest(out)["content_hash"] == recorded  # the rerun wrote it whole again


def test_a_truncated_or_unlisted_shard_reruns_its_stage(run_stage, tmp_path, capsys):
    out = tmp_path / "latents"
    assert run_stage("latents") == 1
    assert STAGES["latents"].output_hash(out) == read_stage_manifest(out)["content_hash"]
    shard = out / "shards" / "8x8" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:512])
    assert run_stage("latents") == 2
    assert capsys.readouterr().out.splitlines()[0].startswith(
        "latents: rerunning, its finished output changed since it finished (content hash ")
    (out / "shards" / "manifest.json").unlink()
    assert run_stage("latents") == 3
    assert capsys.readouterr().out.splitlines()[0] == (
        f"latents: rerunning, its finished output can no longer be read (no shard manifest at "
        f"{out / 'shards' / 'manifest.json'}: run the data stage first)")
    assert run_stage("latents") == 3


def test_only_refuses_to_reuse_a_changed_output(run_stage, tmp_path):
    out = tmp_path / "vae"
    run_stage("vae")
    assert run_stage("vae", mode="reuse") == 1
    (out / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^--only: stage vae's output in .*/vae changed since it finished "
                                         r"\(content hash [0-9a-f]{12}, manifest [0-9a-f]{12}\); run it again first$"):
        run_stage("vae", mode="reuse")
