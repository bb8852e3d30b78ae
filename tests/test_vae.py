"""The single-frame fast path of the VAE's causal convs computes exactly what diffusers' forward computes."""

import copy

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

from kiln.config import load_config
from kiln.vae import SingleFrameCausalConv3d, build_vae, decode_for_training


def _reference_copy(vae):
    ref = copy.deepcopy(vae)
    for module in ref.modules():
        if type(module) is SingleFrameCausalConv3d:
            module.__class__ = QwenImageCausalConv3d
    return ref


def test_single_frame_convs_match_diffusers_forward_and_gradients():
    torch.manual_seed(0)
    fast = build_vae(load_config("smoke").vae)
    assert any(type(m) is SingleFrameCausalConv3d for m in fast.modules())
    ref = _reference_copy(fast)
    assert not any(type(m) is SingleFrameCausalConv3d for m in ref.modules())
    x = torch.randn(2, 3, 1, 32, 48)  # (B, 3, T=1, H, W)
    outs = []
    for vae in (fast, ref):
        z = vae.encode(x).latent_dist.mode()  # (B, C, 1, 4, 6)
        recon = decode_for_training(vae, z)
        recon.square().mean().backward()
        outs.append((z, recon, [p.grad.clone() for p in vae.parameters()]))
    (z_f, r_f, g_f), (z_r, r_r, g_r) = outs
    torch.testing.assert_close(z_f, z_r, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r_f, r_r, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_video_input_falls_back_to_the_causal_forward():
    torch.manual_seed(0)
    fast = build_vae(load_config("smoke").vae).eval()
    ref = _reference_copy(fast)
    x = torch.randn(1, 3, 5, 16, 16)  # five frames: the causal cache path
    with torch.no_grad():
        torch.testing.assert_close(fast.encode(x).latent_dist.mode(), ref.encode(x).latent_dist.mode())


def test_vae_stage_checkpoints_on_sigterm_and_resumes_identically(smoke_latents, tmp_path, monkeypatch):
    import os
    import signal

    from safetensors.torch import load_file

    from kiln.checkpoint import list_checkpoints
    from kiln.preemption import Preempted
    from kiln.tracking import Tracker
    from kiln.trainer import Trainer
    from stages import vae

    cfg = load_config("smoke", ["vae.train.steps=6", "cadence.checkpoint_every=4"])
    inputs = {"data": smoke_latents / "data"}
    vae.run(cfg, inputs, tmp_path / "straight", Tracker(None))
    assert [p.name for p in list_checkpoints(tmp_path / "straight" / "checkpoints")] == ["step-6"]
    original = Trainer.train_step

    def preempted_at_second(self, *args):
        out = original(self, *args)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before it kills the job
        return out

    monkeypatch.setattr(Trainer, "train_step", preempted_at_second)
    with pytest.raises(Preempted, match="vae: stopped by SIGTERM at step 2"):
        vae.run(cfg, inputs, tmp_path / "preempted", Tracker(None))
    monkeypatch.undo()
    vae.run(cfg, inputs, tmp_path / "preempted", Tracker(None))  # resumes at step 2, checkpoints at 4, ends at 6
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(tmp_path / "preempted" / "checkpoints" / "step-6" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_vae_factor_follows_dim_mult():
    """Three levels downsample twice: a 4x VAE, and kiln.geometry says so."""
    from kiln.geometry import vae_factor

    cfg = load_config("smoke", ["vae.dim_mult=[1,2,2]", "data.bucket_multiple=8", "vae.train.crop=16"]).vae
    vae = build_vae(cfg).eval()
    with torch.no_grad():
        z = vae.encode(torch.randn(1, 3, 1, 32, 24)).latent_dist.mode()  # (B, 3, T=1, H, W)
        assert z.shape == (1, cfg.z_dim, 1, 32 // vae_factor(cfg), 24 // vae_factor(cfg)) == (1, cfg.z_dim, 1, 8, 6)
        assert vae.decode(z).sample.shape == (1, 3, 1, 32, 24)


def test_space_to_depth_folds_latent_pixels_into_channels_and_back():
    """A 4x VAE folded by 2 reads as an 8x VAE with 4x the channels: encode_images folds each 2x2 block of its
    normalised latents into channels, decode_latents unfolds them, and the image is the unfolded VAE's."""
    import torch.nn.functional as F

    from kiln.geometry import latent_channels, vae_factor
    from kiln.vae import decode_latents, encode_images

    base = ["vae.dim_mult=[1,2,2]", "data.bucket_multiple=16", "vae.train.crop=16"]
    plain_cfg = load_config("smoke", base).vae
    folded_cfg = load_config("smoke", base + ["vae.space_to_depth=2"]).vae
    assert (vae_factor(plain_cfg), latent_channels(plain_cfg)) == (4, plain_cfg.z_dim)
    assert (vae_factor(folded_cfg), latent_channels(folded_cfg)) == (8, 4 * plain_cfg.z_dim)
    torch.manual_seed(0)
    plain = build_vae(plain_cfg).eval()
    folded = build_vae(folded_cfg).eval()
    folded.load_state_dict(plain.state_dict())  # the same VAE, read two ways
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    z, z_folded = encode_images(plain, images), encode_images(folded, images)
    assert z.shape == (2, plain_cfg.z_dim, 8, 12) and z_folded.shape == (2, 4 * plain_cfg.z_dim, 4, 6)
    assert torch.equal(z_folded, F.pixel_unshuffle(z, 2))
    assert torch.equal(decode_latents(folded, z_folded), decode_latents(plain, z))


@pytest.mark.parametrize("overrides, channels, refusal", [
    (["vae.dim_mult=[1,2,2]", "vae.space_to_depth=2"], 4, "vae.space_to_depth=2"),
    (["vae.encoder=linear"], 1, "vae.encoder='linear'"),
], ids=["folded", "linear-encoder"])
def test_a_vae_variant_trains_and_draws_end_to_end_and_export_refuses_it(tmp_path, overrides, channels, refusal):
    """data -> VAE -> latents -> pretrain -> images for the VAE variants QwenImagePipeline cannot hold: a 4x VAE
    folded by 2 (latents with 4x the channels at an 8x VAE's size) and a linear encoder. The saved VAE loads back to
    the latents the stage wrote, the sampler draws full-size images, and export refuses with the option's name."""
    from data.shards import iter_samples
    from kiln.images import image_tensor
    from kiln.vae import encode_images, load_vae, vae_for
    from stages.common import data_vae_latents, run_without_orchestration
    from stages.export import export_diffusers
    from stages.sampling import generate_for_captions, load_stage

    cfg = load_config("smoke", [*overrides, "train.rungs.0.steps=3"])
    root = data_vae_latents(cfg, tmp_path)
    sample = next(iter(iter_samples(root / "latents" / "shards")))
    assert sample["latents"].shape[0] == channels * cfg.vae.z_dim  # (C s^2, H/8, W/8)
    image = next(iter(iter_samples(root / "data" / "shards", load_images=True)))
    assert image["key"] == sample["key"]
    again = encode_images(load_vae(root / "vae", cfg.vae), image_tensor(image["image"])[None])[0]
    assert torch.allclose(again, torch.as_tensor(sample["latents"]).float(), atol=1e-2)  # stored as float16
    if cfg.vae.encoder == "linear":  # the weights say which encoder; a config that says otherwise is refused
        without_cfg = encode_images(load_vae(root / "vae"), image_tensor(image["image"])[None])[0]
        assert torch.allclose(without_cfg, again)
        with pytest.raises(ValueError, match="set vae.encoder=linear"):
            load_vae(root / "vae", load_config("smoke").vae)
    run_without_orchestration([("pretrain", "pretrain", {"latents": root / "latents", "vae": root / "vae"})],
                              cfg, tmp_path)
    stage_cfg, model, vae_dir, _ = load_stage(tmp_path / "pretrain")
    images = generate_for_captions(stage_cfg, model, vae_for(stage_cfg, vae_dir, "cpu"), ["a red circle"], width=32,
                                   height=48, steps=2, cfg_scale=4.0, seed=0)
    assert images[0].size == (32, 48)
    with pytest.raises(ValueError, match=refusal):
        export_diffusers(tmp_path / "pretrain", tmp_path / "exported")


def test_a_linear_encoder_is_affine_in_the_image_and_saves_no_encoder_network():
    """vae.encoder=linear: the latent of a blend is the blend of the latents (the default encoder's is not), and
    the unused encoder network is not in the weights."""
    from kiln.vae import encode_images

    torch.manual_seed(0)
    x, y = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    for encoder, affine in (("linear", True), ("qwen-image", False)):
        vae = build_vae(load_config("smoke", [f"vae.encoder={encoder}"]).vae).eval()
        blend = encode_images(vae, (x + y) / 2)
        assert torch.allclose(blend, (encode_images(vae, x) + encode_images(vae, y)) / 2, atol=1e-5) == affine
        assert any(k.startswith(("encoder.", "quant_conv.")) for k in vae.state_dict()) != affine


class _PixelVAE:
    """A stand-in VAE whose latent is the image itself; `swap` recolours decoded pixels (a colour the VAE loses)."""

    def __init__(self, swap=None):
        self.swap = swap

    def eval(self):
        return self

    def encode(self, x):
        return type("Out", (), {"latent_dist": type("Dist", (), {"mode": lambda _: x})()})()

    def decode(self, z):
        out = z.clone()
        if self.swap is not None:
            src, dst = (torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1, 1) / 127.5 - 1 for c in self.swap)
            hit = ((z - src).abs() < 0.02).all(dim=1, keepdim=True)
            out = torch.where(hit, dst.expand_as(z), z)
        return type("Dec", (), {"sample": out})()


def test_reconstruction_check_names_the_colour_a_vae_loses():
    import random

    from data.synthetic import COLOUR_RGB, SceneSpec, caption, render
    from kiln.images import image_tensor
    from stages.vae import reconstruction_check

    cfg = load_config("smoke")
    rng = random.Random(0)
    specs = [SceneSpec("single", c, s) for c in COLOUR_RGB for s in ("circle", "square", "triangle")]
    specs += [SceneSpec("single", "purple", "circle")]  # a training-only colour the verifier cannot read: left out
    images = [image_tensor(render(spec, 64, 64, rng)[0]) for spec in specs]
    captions = [caption(spec, rng) for spec in specs]
    perfect = reconstruction_check(cfg, _PixelVAE(), images, captions, "cpu")
    assert perfect["vae/recon/correct"] == 1.0 and perfect["vae/recon/colour_worst"] == 1.0
    red_as_yellow = reconstruction_check(cfg, _PixelVAE((COLOUR_RGB["red"], COLOUR_RGB["yellow"])), images,
                                         captions, "cpu")
    assert red_as_yellow["vae/recon/colour_red"] == 0.0 and red_as_yellow["vae/recon/colour_worst"] == 0.0
    assert red_as_yellow["vae/recon/colour_yellow"] == 1.0
    assert red_as_yellow["vae/recon/correct"] == 0.75  # the 9 scenes of the other three colours


@pytest.mark.parametrize("checkpoint_every", [3, 100])  # 100: the failed attempt never wrote a checkpoint
def test_a_vae_that_loses_a_colour_is_trained_again_from_another_seed(smoke_latents, tmp_path, monkeypatch,
                                                                       checkpoint_every):
    from safetensors.torch import load_file

    from kiln.tracking import Tracker
    from stages import vae as vae_stage

    cfg = load_config("smoke", ["vae.train.attempts=2", f"cadence.checkpoint_every={checkpoint_every}"])
    checks = iter([0.25, 1.0])  # the first attempt keeps a colour in a quarter of its reconstructions

    def check(*args):
        return {"vae/recon/correct": 0.5, "vae/recon/colour_worst": next(checks)}

    monkeypatch.setattr(vae_stage, "reconstruction_check", check)
    result = vae_stage.run(cfg, {"data": smoke_latents / "data"}, tmp_path, Tracker(None))
    assert result.metrics["vae/attempts"] == 2 and result.metrics["vae/recon/colour_worst"] == 1.0
    assert (tmp_path / "failed-attempt-0").is_dir()
    if checkpoint_every > cfg.vae.train.steps:
        return
    first = load_file(next((tmp_path / "failed-attempt-0").rglob("*.safetensors")))
    second = load_file(next((tmp_path / "checkpoints").rglob("*.safetensors")))
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)  # another seed, not the same run twice


def test_channel_permute_reorders_each_crops_colours_and_nothing_else():
    import random

    from stages.vae import _random_crops

    red = torch.zeros(3, 8, 8)
    red[0] = 1.0  # a red image: channel 0 on
    kept = _random_crops([red], 64, 8, random.Random(0))
    assert torch.equal(kept, red.expand(64, 3, 8, 8))
    permuted = _random_crops([red], 64, 8, random.Random(0), channel_permute=1.0)
    lit = permuted.sum(dim=(2, 3)) > 0  # (64, 3): which channel each crop has on
    assert torch.equal(lit.sum(dim=1), torch.ones(64, dtype=torch.long))  # still one pure channel, same pixels
    assert torch.equal(permuted.sum(dim=1), red.sum(dim=0).expand(64, 8, 8))
    assert lit.any(dim=0).all()  # red became green and blue too
    half = _random_crops([red], 400, 8, random.Random(0), channel_permute=0.5)
    share = (half[:, 0].sum(dim=(1, 2)) == 0).float().mean().item()  # red gone: permuted, not the identity
    assert 0.25 < share < 0.42  # 0.5 x 4/6 of the non-identity orders = 1/3
