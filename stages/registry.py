"""Every stage kind, declared once: its module, its inputs and where they come from, the config sections its cache key
reads, whether it trains data parallel and whether an eval stage follows it. The pipeline's order and wiring
(`pipeline_plan`), its cache keys (`stage_cache_key`) and torchrun eligibility (stages/worker.py) are derived from
STAGES; a new stage is a module stages/<kind>.py with `run(cfg, inputs, out_dir, tracker)` and one entry here.

An input is named by the stage kind that provides it (its latest instance so far in the pipeline, e.g. the last
pretrain rung), or by the role LATEST_GENERATOR: the latest stage that trains the generator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from data.shards import combined_hash
from data.shards import content_hash as shards_content_hash
from data.shards import read_manifest as read_shards_manifest
from kiln.config import POST_TRAINING_STAGES, KilnConfig
from kiln.stage_io import cache_key, code_fingerprint, file_sha256, hash_files

LATEST_GENERATOR = "<latest generator>"  # not a stage kind: the latest stage before this one with trains_generator


def checkpoints_hash(out_dir: Path) -> str:
    return hash_files(Path(out_dir) / "checkpoints")


def samples_hash(out_dir: Path) -> str:
    return hash_files(Path(out_dir) / "samples")


def shards_hash(out_dir: Path) -> str:
    """OUT/shards' content hash computed from the shard files themselves, not copied from their manifest, combined
    with OUT/heldout's where there is one (data.shards.combined_hash)."""
    def files_of(shard_dir: Path) -> str:
        relpaths = read_shards_manifest(shard_dir)["shards"]
        return shards_content_hash(file_sha256(shard_dir / relpath) for relpath in relpaths)

    held = Path(out_dir) / "heldout"
    return combined_hash(files_of(Path(out_dir) / "shards"),
                         files_of(held) if (held / "manifest.json").exists() else None)


def files_hash(pattern: str) -> Callable[[Path], str]:
    return lambda out_dir: hash_files(Path(out_dir), pattern)


@dataclass(frozen=True)
class StageSpec:
    kind: str
    # The config sections (or dotted keys) its cache key covers; never `cadence`, which changes no output.
    sections: tuple[str, ...]
    # How to hash its finished output again; it equals the content_hash its run() returns.
    output_hash: Callable[[Path], str]
    # run()'s input key -> the stage kind (or LATEST_GENERATOR) whose output it is.
    inputs: Mapping[str, str] = field(default_factory=dict)
    optional: frozenset[str] = frozenset()  # inputs that may be absent (None): a first rung has no init
    data_parallel: bool = False  # several processes under torchrun when distributed.world_size > 1
    trains_generator: bool = False  # an eval stage follows it, and it is later stages' LATEST_GENERATOR
    per_rung: bool = False  # one instance per train.rungs entry, named <kind>-<resolution>, given rung_index

    @property
    def module(self) -> str:
        return f"stages.{self.kind}"


STAGES: dict[str, StageSpec] = {spec.kind: spec for spec in (
    StageSpec("data", ("seed", "data", "text_encoder", "train.rungs.resolution", "sampler.negative_prompt"),
              shards_hash),
    StageSpec("vae", ("seed", "vae"), checkpoints_hash, inputs={"data": "data"}),
    StageSpec("latents", ("vae",), shards_hash, inputs={"data": "data", "vae": "vae"}),
    StageSpec("pretrain", ("seed", "model", "objective", "scheduler", "train", "text_encoder", "lora"),
              checkpoints_hash,
              inputs={"latents": "latents", "vae": "vae", "init": LATEST_GENERATOR}, optional=frozenset({"init"}),
              data_parallel=True, trains_generator=True, per_rung=True),
    # previous: the eval stage before it (same prompts and noise), for the paired gain over that stage.
    # data, latents: task captions' held-out split (real images for FD, latents for the held-out loss).
    StageSpec("eval", ("eval", "sampler", "scheduler", "task"), samples_hash,
              inputs={"model": LATEST_GENERATOR, "features": "features", "previous": "eval", "data": "data",
                      "latents": "latents"},
              optional=frozenset({"features", "previous", "data", "latents"})),
    StageSpec("features", ("seed", "features", "task"), files_hash("feature_net.*"), inputs={"data": "data"}),
    StageSpec("sft", ("seed", "sft", "model", "objective", "scheduler", "train", "text_encoder", "data.aspect_ratios",
                         "lora"),
              checkpoints_hash, inputs={"latents": "latents", "vae": "vae", "init": LATEST_GENERATOR},
              data_parallel=True, trains_generator=True),
    StageSpec("preference", ("preference", "sampler.negative_prompt", "scheduler", "eval.resolution",
                             "data.holdout_seed", "task"), shards_hash,
              inputs={"model": LATEST_GENERATOR, "vae": "vae", "data": "data", "features": "features"},
              optional=frozenset({"data", "features"})),
    StageSpec("reward", ("seed", "reward", "task"), files_hash("reward_model.*"),
              inputs={"pairs": "preference", "vae": "vae", "data": "data"}),
    StageSpec("dpo", ("seed", "dpo", "objective", "scheduler", "lora"), checkpoints_hash,
              inputs={"pairs": "preference", "init": LATEST_GENERATOR, "vae": "vae"},
              data_parallel=True, trains_generator=True),
    StageSpec("grpo", ("grpo", "sampler.negative_prompt", "scheduler", "data.holdout_seed", "lora", "task"),
              checkpoints_hash,
              inputs={"init": LATEST_GENERATOR, "vae": "vae", "reward": "reward", "data": "data", "features": "features"},
              optional=frozenset({"reward", "data", "features"}),
              data_parallel=True, trains_generator=True),
)}

# The kinds `kiln run` chains, in order (the post-training ones only when listed in the config's post_training).
# Every stage that trains the generator is followed by an eval stage. `features` runs for task captions (the
# evaluation's FD features and alignment judge); on the synthetic task it serves `kiln compare-systems`.
PIPELINE = ("data", "features", "vae", "latents", "pretrain", "sft", "preference", "reward", "dpo", "grpo")


@dataclass(frozen=True)
class PlannedStage:
    name: str  # its output folder under the run folder
    kind: str
    inputs: dict[str, str | None]  # run()'s input key -> the name of the stage whose output it is (None: absent)
    rung_index: int | None = None


def stage_inputs(kind: str, available: Mapping[str, str | None]) -> dict[str, str | None]:
    """The inputs of a `kind` stage, each taken from available (stage kind or LATEST_GENERATOR -> a stage name or
    output folder); an optional input that is not available is None."""
    spec, inputs = STAGES[kind], {}
    for key, provider in spec.inputs.items():
        inputs[key] = available.get(provider)
        if inputs[key] is None and key not in spec.optional:
            raise ValueError(f"{kind}: input '{key}' comes from a {provider} stage, and none runs before it")
    return inputs


def pipeline_plan(cfg: KilnConfig) -> list[PlannedStage]:
    """Every stage of this config's pipeline, in the order the flow runs them, wired to their inputs."""
    plan: list[PlannedStage] = []
    latest: dict[str, str | None] = {LATEST_GENERATOR: None}  # stage kind or role -> the name of its latest stage
    for kind in PIPELINE:
        if kind in POST_TRAINING_STAGES and kind not in cfg.post_training:
            continue
        if kind == "features" and cfg.task_kind != "captions":
            continue
        spec = STAGES[kind]
        instances = [(f"{kind}-{rung.resolution}", i) for i, rung in enumerate(cfg.train.rungs)] if spec.per_rung \
            else [(kind, None)]
        for name, rung_index in instances:
            plan.append(PlannedStage(name, kind, stage_inputs(kind, latest), rung_index))
            latest[kind] = name
            if spec.trains_generator:
                latest[LATEST_GENERATOR] = name
                plan.append(PlannedStage(f"eval-{name}", "eval", stage_inputs("eval", latest)))
                latest["eval"] = f"eval-{name}"
    return plan


def stage_config(cfg: KilnConfig, kind: str, rung_index: int | None = None) -> dict:
    """The config sections a `kind` stage's cache key covers; a rung's `train` holds only that rung."""
    tree = cfg.model_dump(mode="json")
    out = {}
    for section in STAGES[kind].sections:
        if section == "train.rungs.resolution":
            out[section] = [r["resolution"] for r in tree["train"]["rungs"]]
        elif section == "lora":  # only a stage that trains an adapter reads the adapter's settings
            name = f"pretrain-{cfg.train.rungs[rung_index].resolution}" if rung_index is not None else kind
            out[section] = {k: v for k, v in tree["lora"].items() if k != "stages"} if cfg.uses_lora(name) else None
        elif section == "train" and rung_index is not None:
            out[section] = {**tree["train"], "rungs": tree["train"]["rungs"][rung_index]}
        else:  # a section or a dotted key inside one
            node = tree
            for part in section.split("."):
                node = node[part]
            out[section] = node
    return out


def stage_cache_key(cfg: KilnConfig, kind: str, input_hashes: dict[str, str], rung_index: int | None = None) -> str:
    """Same key, same output: the stage's kind, its config sections, its inputs' content and the code it uses."""
    return cache_key(kind, stage_config(cfg, kind, rung_index), input_hashes, code_fingerprint(STAGES[kind].module))
