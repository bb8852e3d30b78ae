import pytest
import torch

from kiln.config import ConfigError, load_config, preset_names
from kiln.models import build_backbone, count_parameters


def test_presets_load():
    assert {"tiny", "small", "qwen-image", "smoke"} <= set(preset_names())
    for name in preset_names():
        # tiny-finetune starts from weights the user names (there are none to ship); any diffusers folder will do.
        cfg = load_config(name, ["model.pretrained=DIR"] if name == "tiny-finetune" else [])
        assert cfg.name == name


def test_overrides_apply_and_validate():
    cfg = load_config("tiny", ["train.rungs.0.steps=7", "sampler.cfg=2.5", "data.aspect_ratios=[\"1:1\"]"])
    assert cfg.train.rungs[0].steps == 7
    assert cfg.sampler.cfg == 2.5
    assert cfg.data.aspect_ratios == ["1:1"]


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.num_layerz=3", ["unknown key", "model.num_layerz"]),
        ("train.rungs.0.steps=-1", ["train.rungs.0.steps", "greater than 0"]),
        ("sampler.cfg=banana", ["sampler.cfg", "banana"]),
        ("data.aspect_ratios=[\"5:1\"]", ["data.aspect_ratios", "5:1"]),
        ("model.axes_dims_rope=[4,4,4]", ["model", "axes_dims_rope"]),
        ("train.rungs.0.resolution=70", ["multiple of 16"]),
        ("nonsense", ["key.path=value"]),
        ("data.extra_colours=[red]", ["extra colour", "red", "purple"]),
        ("data.extra_shapes=[circle]", ["extra shape", "circle", "diamond"]),
    ],
)
def test_bad_values_are_one_line_errors(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.rungs.5.steps=3",
         "config: no entry '5' in 'train.rungs.5.steps': 'train.rungs' is a list of 2 (indexes 0..1)"),
        ("train.rungs.x.steps=3",
         "config: no entry 'x' in 'train.rungs.x.steps': 'train.rungs' is a list of 2 (indexes 0..1)"),
        ("train.rungs.-1.steps=3",  # not Python's count from the end: a typo would edit the last rung
         "config: no entry '-1' in 'train.rungs.-1.steps': 'train.rungs' is a list of 2 (indexes 0..1)"),
        ("data.aspect_ratios.2=\"1:1\"",  # the index is the last part of the key
         "config: no entry '2' in 'data.aspect_ratios.2': 'data.aspect_ratios' is a list of 2 (indexes 0..1)"),
        ("data.aspect_ratios.0.x=1", "config: 'data.aspect_ratios.0.x' goes through '0', which is not a section"),
        ("train..steps=3", "--set expects key.path=value with no empty part in the key, got 'train..steps=3'"),
        ("sampler.cfg=[1,",
         "--set sampler.cfg: the value '[1,' is not valid YAML (expected the node content, but found '<stream end>')"),
    ],
)
def test_bad_override_paths_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [override])  # smoke: 2 rungs, 2 aspect ratios
    assert str(err.value) == message


def test_an_empty_list_names_no_index():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", {"train.rungs": [], "train.rungs.0.steps": 3})
    assert str(err.value) == "config: no entry '0' in 'train.rungs.0.steps': 'train.rungs' is a list of 0 (no index)"


def test_unknown_preset():
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        load_config("nope")


def test_qwen_image_preset_is_20b_on_meta_device():
    """The published configuration, built without allocating a byte of weights."""
    cfg = load_config("qwen-image")
    model = build_backbone(cfg.model, cfg.vae.z_dim, cfg.text_encoder.dim, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.config.num_layers == 60 and model.inner_dim == 3072 and model.config.joint_attention_dim == 3584
    assert model.config.in_channels == 64 and model.config.out_channels == 16
    params = count_parameters(model)
    assert 20.2e9 < params < 20.6e9, params


def test_tiny_model_builds():
    cfg = load_config("tiny")
    model = build_backbone(cfg.model, cfg.vae.z_dim, cfg.text_encoder.dim)
    x = torch.randn(2, 16, cfg.vae.z_dim * 4)
    out = model(hidden_states=x, encoder_hidden_states=torch.randn(2, 5, 384), timestep=torch.rand(2),
                img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]
    assert out.shape == x.shape


def test_post_training_options_keep_trl_vocabulary():
    """DPO and GRPO options named after TRL's DPOConfig / GRPOConfig fields mean what TRL means by them."""
    import dataclasses

    from trl import DPOConfig, GRPOConfig

    from kiln.config import DpoConfig, GrpoConfig

    trl_dpo = {f.name for f in dataclasses.fields(DPOConfig)}
    trl_grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert {"beta", "learning_rate", "max_steps", "per_device_train_batch_size", "warmup_steps",
            "max_grad_norm"} == set(DpoConfig.model_fields) & trl_dpo
    shared = {"beta", "epsilon", "epsilon_high", "num_generations", "scale_rewards", "num_iterations",
              "learning_rate", "max_steps", "max_grad_norm", "reward_weights", "seed"}
    assert shared == set(GrpoConfig.model_fields) & trl_grpo
    assert set(GrpoConfig.model_fields) - shared == {  # diffusion-specific, no TRL counterpart
        "reward", "reward_model", "prompts_per_step", "num_inference_steps", "noise_level", "cfg",
        "timestep_fraction", "prompt_kinds", "sde_window", "sde_window_starts", "shared_initial_noise",
        "heldout_prompts", "objective", "nft_beta", "nft_timesteps"}


@pytest.mark.parametrize(
    "overrides, words",
    [
        # Qwen-Image's transformer reads 2x2-packed latent tokens: another patch size would fail at the first forward.
        (["model.patch_size=4"], ["model.patch_size 4", "qwen-image takes only 2"]),
        (["data.bucket_multiple=8"], ["data.bucket_multiple 8", "multiple of 16"]),
        # SD3 patchifies the unpacked latents itself: patch 4 needs latents divisible by 4, so 32 px buckets.
        (["model.kind=sd3", "model.patch_size=4"], ["data.bucket_multiple 16", "multiple of 32", "model.patch_size 4"]),
        (["vae.dim_mult=[1]"], ["vae.dim_mult"]),
    ],
)
def test_geometry_the_model_cannot_take_is_a_one_line_error(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_geometry_is_derived_from_the_vae_and_the_patch():
    from kiln.geometry import size_multiple, vae_factor

    assert vae_factor(load_config("smoke").vae) == 8 and size_multiple(load_config("smoke")) == 16
    assert vae_factor(load_config("qwen-image").vae) == 8  # the pretrained VAE
    four_x = load_config("smoke", ["vae.dim_mult=[1,2,2]", "data.bucket_multiple=8", "vae.train.crop=16"])  # 2 downs
    assert vae_factor(four_x.vae) == 4 and size_multiple(four_x) == 8


def test_a_patch_size_the_config_accepts_trains_in_a_forward_pass():
    """SD3's MMDiT with 4x4 patches: the accepted config runs the training loss on latents of its bucket size."""
    from kiln.diffusion import diffusion_loss
    from kiln.geometry import size_multiple, vae_factor

    cfg = load_config("smoke", ["model.kind=sd3", "model.patch_size=4", "data.bucket_multiple=32"])
    side = size_multiple(cfg) // vae_factor(cfg.vae)  # one bucket step of latents: 4
    torch.manual_seed(0)
    model = build_backbone(cfg.model, cfg.vae.z_dim, cfg.text_encoder.dim)
    latents = torch.randn(2, cfg.vae.z_dim, 2 * side, 3 * side)  # (B, C, 8, 12): a 64x96 px image
    text, mask = torch.randn(2, 5, cfg.text_encoder.dim), torch.ones(2, 5, dtype=torch.bool)
    loss, per_sample, _ = diffusion_loss(model, latents, text, mask, cfg.objective, cfg.scheduler,
                                         torch.Generator().manual_seed(0))
    assert per_sample.shape == (2,) and torch.isfinite(loss)
    loss.backward()
    assert model.pos_embed.proj.kernel_size == (4, 4) and model.pos_embed.proj.weight.grad is not None


def test_grpo_window_must_fit_the_sampling_steps():
    with pytest.raises(ConfigError, match=r"the SDE window \(sde_window 3, starting as late as step 8\) runs past "
                                          r"num_inference_steps 10"):
        load_config("tiny", ["grpo.sde_window=3", "grpo.sde_window_starts=9"])
    # The verifier-based rewards need no reward stage; the learned one does.
    load_config("tiny", ["post_training=[grpo]", "grpo.reward=verifier_dense"])
    with pytest.raises(ConfigError, match="grpo.reward 'reward_model' needs the reward stage or grpo.reward_model"):
        load_config("tiny", ["post_training=[grpo]", "grpo.reward=reward_model"])


def test_a_linear_encoder_is_refused_for_a_pretrained_vae():
    with pytest.raises(ConfigError, match="vae.encoder='linear' is for a VAE trained here"):
        load_config("tiny", ["vae.pretrained=some/vae", "vae.encoder=linear"])
