import pytest
import torch

from kiln.config import ConfigError, load_config, preset_names
from kiln.models import build_backbone, count_parameters


def test_presets_load():
    assert {"tiny", "small", "qwen-image", "smoke"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
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
    ],
)
def test_bad_values_are_one_line_errors(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


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
        "timestep_fraction", "prompt_kinds"}
