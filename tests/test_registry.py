"""The stage registry: the pipeline's order and wiring, torchrun eligibility and the one list of permanent errors."""

import importlib.util
import types

import pytest

from kiln.config import POST_TRAINING_STAGES, load_config
from kiln.errors import PERMANENT_ERRORS, is_permanent, permanent_class
from stages.registry import LATEST_GENERATOR, PIPELINE, STAGES, PlannedStage, pipeline_plan, stage_inputs


def test_the_smoke_plan_wires_every_stage_to_its_inputs():
    assert pipeline_plan(load_config("smoke")) == [
        PlannedStage("data", "data", {}),
        PlannedStage("vae", "vae", {"data": "data"}),
        PlannedStage("latents", "latents", {"data": "data", "vae": "vae"}),
        PlannedStage("pretrain-32", "pretrain", {"latents": "latents", "vae": "vae", "init": None}, 0),
        PlannedStage("eval-pretrain-32", "eval", {"model": "pretrain-32", "features": None, "previous": None, "data": "data", "latents": "latents"}),
        PlannedStage("pretrain-64", "pretrain", {"latents": "latents", "vae": "vae", "init": "pretrain-32"}, 1),
        PlannedStage("eval-pretrain-64", "eval", {"model": "pretrain-64", "features": None,
                                                   "previous": "eval-pretrain-32", "data": "data", "latents": "latents"}),
        PlannedStage("sft", "sft", {"latents": "latents", "vae": "vae", "init": "pretrain-64"}),
        PlannedStage("eval-sft", "eval", {"model": "sft", "features": None, "previous": "eval-pretrain-64", "data": "data", "latents": "latents"}),
        PlannedStage("preference", "preference", {"model": "sft", "vae": "vae", "data": "data", "features": None}),
        PlannedStage("reward", "reward", {"pairs": "preference", "vae": "vae", "data": "data"}),
        PlannedStage("dpo", "dpo", {"pairs": "preference", "init": "sft", "vae": "vae"}),
        PlannedStage("eval-dpo", "eval", {"model": "dpo", "features": None, "previous": "eval-sft", "data": "data", "latents": "latents"}),
        PlannedStage("grpo", "grpo", {"init": "dpo", "vae": "vae", "reward": "reward", "data": "data",
                                      "features": None}),
        PlannedStage("eval-grpo", "eval", {"model": "grpo", "features": None, "previous": "eval-dpo", "data": "data", "latents": "latents"}),
    ]


def test_post_training_picks_the_stages_and_the_latest_generator_feeds_the_next():
    cfg = load_config("smoke", ["post_training=[preference, grpo]", "grpo.reward=verifier"])
    plan = {stage.name: stage for stage in pipeline_plan(cfg)}
    assert list(plan)[-4:] == ["eval-pretrain-64", "preference", "grpo", "eval-grpo"]
    assert plan["preference"].inputs == {"model": "pretrain-64", "vae": "vae", "data": "data", "features": None}
    assert plan["grpo"].inputs == {"init": "pretrain-64", "vae": "vae", "reward": None, "data": "data",
                                   "features": None}
    assert [stage.name for stage in pipeline_plan(load_config("smoke", ["post_training=[]"]))] == [
        "data", "vae", "latents", "pretrain-32", "eval-pretrain-32", "pretrain-64", "eval-pretrain-64"]


def test_a_required_input_without_its_stage_is_one_line():
    with pytest.raises(ValueError, match=r"^dpo: input 'pairs' comes from a preference stage, and none runs before "
                                         r"it$"):
        stage_inputs("dpo", {LATEST_GENERATOR: "sft", "vae": "vae"})


def test_every_stage_kind_is_a_module_and_the_pipeline_order_matches_the_config():
    assert all(importlib.util.find_spec(spec.module) for spec in STAGES.values())
    assert set(PIPELINE) <= set(STAGES)
    assert [kind for kind in PIPELINE if kind in POST_TRAINING_STAGES] == list(POST_TRAINING_STAGES)
    assert [kind for kind, spec in STAGES.items() if spec.data_parallel] == ["pretrain", "sft", "dpo", "grpo"]
    assert [kind for kind, spec in STAGES.items() if spec.trains_generator] == ["pretrain", "sft", "dpo", "grpo"]


def test_launch_runs_only_data_parallel_stages(smoke_config, tmp_path):
    from stages.worker import launch

    with pytest.raises(ValueError, match="^eval: not a data-parallel stage"):
        launch("eval", smoke_config, {}, tmp_path, None, None)


def test_one_list_of_permanent_errors_for_the_flow_and_torchrun():
    from data.shards import ShardError
    from flows.pipeline import retry_transient
    from kiln.preemption import Preempted
    from stages.worker import REPORTED_ERRORS

    assert list(REPORTED_ERRORS.values()) == list(PERMANENT_ERRORS)
    assert permanent_class(ShardError("shard 3 truncated")) is ValueError  # torchrun re-raises it as a ValueError
    assert permanent_class(FileExistsError("x")) is FileExistsError and permanent_class(OSError("x")) is None
    assert is_permanent(Preempted("stopped")) and not is_permanent(RuntimeError("NCCL timeout"))
    assert retry_transient(None, None, types.SimpleNamespace(data=OSError("disk hiccup")))
    assert not retry_transient(None, None, types.SimpleNamespace(data=FloatingPointError("loss is nan")))
