"""Cache keys from the stage registry: what changes a stage's key, and what leaves it alone. Pure functions on the
smoke preset's plan; no stage runs. Each stage's output is taken to be a function of its key (same key, same
output), so a changed key reaches the stages downstream through their input content hashes."""

import shutil
from pathlib import Path

import pytest

from kiln import stage_io
from kiln.config import load_config
from stages.registry import STAGES, pipeline_plan, stage_cache_key

ALL = ["data", "vae", "latents", "pretrain-32", "eval-pretrain-32", "pretrain-64", "eval-pretrain-64",
       "sft", "eval-sft", "preference", "reward", "dpo", "eval-dpo", "grpo", "eval-grpo"]


def plan_keys(cfg) -> dict[str, str]:
    """Every planned stage's cache key, each stage's content hash standing in as its key."""
    keys = {}
    for stage in pipeline_plan(cfg):
        input_hashes = {key: keys[source] for key, source in stage.inputs.items() if source}
        keys[stage.name] = stage_cache_key(cfg, stage.kind, input_hashes, stage.rung_index)
    return keys


def changed(before: dict, after: dict) -> list[str]:
    assert list(before) == list(after) == ALL
    return [name for name in before if before[name] != after[name]]


@pytest.fixture(scope="module")
def smoke_keys():
    return plan_keys(load_config("smoke"))


def test_no_stage_reads_the_cadence_section():
    assert all(not section.startswith("cadence") for spec in STAGES.values() for section in spec.sections)


def test_a_cadence_change_leaves_every_key_unchanged(smoke_keys):
    cadence = ["cadence.log_every=7", "cadence.checkpoint_every=5", "cadence.keep_checkpoints=4",
               "cadence.sample_every=9", "cadence.cache_in_memory=false"]
    assert changed(smoke_keys, plan_keys(load_config("smoke", cadence))) == []
    base, other = load_config("smoke"), load_config("smoke", cadence)
    for kind in STAGES:  # features too, which `kiln run` does not plan
        assert stage_cache_key(base, kind, {}, 0) == stage_cache_key(other, kind, {}, 0), kind


def test_a_stage_section_changes_that_stage_and_its_dependents(smoke_keys):
    assert changed(smoke_keys, plan_keys(load_config("smoke", ["dpo.beta=100"]))) == \
        ["dpo", "eval-dpo", "grpo", "eval-grpo"]
    # A rung's key holds only its own rung: the second rung's steps leave the first rung alone.
    assert changed(smoke_keys, plan_keys(load_config("smoke", ["train.rungs.1.steps=5"]))) == ALL[5:]
    # Evaluation settings reach the eval stages and nothing else (no stage reads an eval's output).
    assert changed(smoke_keys, plan_keys(load_config("smoke", ["eval.steps=4"]))) == \
        [name for name in ALL if name.startswith("eval-")]


def _copy_tree(to: Path) -> Path:
    for package in stage_io.PROJECT_PACKAGES:
        shutil.copytree(stage_io.ROOT / package, to / package, ignore=shutil.ignore_patterns("__pycache__"))
    return to


def test_a_code_edit_changes_that_stage_and_its_dependents_only(smoke_keys, tmp_path, monkeypatch):
    monkeypatch.setattr(stage_io, "ROOT", _copy_tree(tmp_path))
    cfg = load_config("smoke")
    assert plan_keys(cfg) == smoke_keys  # the copy fingerprints the same
    with open(tmp_path / "stages" / "dpo.py", "a") as source:
        source.write("\n# an edit\n")
    assert changed(smoke_keys, plan_keys(cfg)) == ["dpo", "eval-dpo", "grpo", "eval-grpo"]


def test_a_module_outside_every_stage_changes_no_key(smoke_keys, tmp_path, monkeypatch):
    monkeypatch.setattr(stage_io, "ROOT", _copy_tree(tmp_path))
    (tmp_path / "kiln" / "unused_helper.py").write_text("VALUE = 1\n")
    assert changed(smoke_keys, plan_keys(load_config("smoke"))) == []


def test_the_fingerprint_follows_project_imports_anywhere_in_a_module(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_io, "ROOT", tmp_path)
    files = {
        "stages/__init__.py": "",
        "stages/thing.py": "import json\nfrom kiln import helper\n\ndef run():\n    from data.deep import x\n",
        "stages/unused.py": "",
        "kiln/__init__.py": "",
        "kiln/helper.py": "from .sibling import y\n",
        "kiln/sibling.py": "y = 1\n",
        "data/__init__.py": "",
        "data/deep.py": "import numpy\nx = 1\n",
    }
    for relpath, text in files.items():
        (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relpath).write_text(text)
    closure = [path.relative_to(tmp_path).as_posix() for path in stage_io.module_closure("stages.thing")]
    assert closure == ["data/__init__.py", "data/deep.py", "kiln/__init__.py", "kiln/helper.py", "kiln/sibling.py",
                       "stages/__init__.py", "stages/thing.py"]
    before = stage_io.code_fingerprint("stages.thing")
    (tmp_path / "stages/unused.py").write_text("z = 2\n")
    assert stage_io.code_fingerprint("stages.thing") == before
    (tmp_path / "kiln/sibling.py").write_text("y = 2\n")
    assert stage_io.code_fingerprint("stages.thing") != before


def test_lora_settings_change_only_the_stages_that_train_an_adapter(smoke_keys):
    with_grpo_adapter = plan_keys(load_config("smoke", ["lora.stages=[grpo]"]))
    assert changed(smoke_keys, with_grpo_adapter) == ["grpo", "eval-grpo"]
    other_rank = plan_keys(load_config("smoke", ["lora.stages=[grpo]", "lora.rank=4"]))
    assert changed(with_grpo_adapter, other_rank) == ["grpo", "eval-grpo"]
    rung = plan_keys(load_config("smoke", ["lora.stages=[grpo, pretrain-64]"]))
    assert changed(with_grpo_adapter, rung) == ["pretrain-64", "eval-pretrain-64", "sft", "eval-sft", "preference",
                                                "reward", "dpo", "eval-dpo", "grpo", "eval-grpo"]
