"""The project's sampler against diffusers' QwenImagePipeline on the same weights, embeddings, seed and steps."""

import numpy as np
import torch
from diffusers import QwenImagePipeline

from kiln.generate import generate_images, generate_latents, to_pil
from kiln.geometry import vae_factor
from kiln.models import build_backbone, unpack
from kiln.diffusion import Denoiser, make_process
from kiln.sampler import flow_sigmas, make_scheduler, sample_euler
from kiln.vae import build_vae


def test_sigmas_match_qwen_scheduler(smoke_config):
    sigmas = flow_sigmas(10, 64, smoke_config.scheduler)
    assert sigmas.shape == (11,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert (sigmas[:-1] > sigmas[1:]).all()
    assert abs(sigmas[-2].item() - 0.02) < 1e-6  # Qwen-Image's shift_terminal


def test_euler_is_exact_for_straight_paths():
    """With the true velocity of a straight path, Euler lands on x0 in any number of steps."""
    x0, noise = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    for steps in (1, 3, 10):
        out = sample_euler(Denoiser(lambda x, s: noise - x0, "flow", make_process(None)), noise.clone(), torch.linspace(1, 0, steps + 1))
        assert torch.allclose(out, x0, atol=1e-5)


def test_same_image_as_qwen_image_pipeline(smoke_config, text_encoder):
    cfg = smoke_config
    torch.manual_seed(0)
    model = build_backbone(cfg.model, cfg.vae.z_dim, cfg.text_encoder.dim).eval()
    vae = build_vae(cfg.vae).eval()
    text, mask = text_encoder(["a red circle", "three blue squares"])
    null, null_mask = text_encoder(["a blurry picture"])
    kwargs = dict(height=64, width=48, vae_factor=vae_factor(cfg.vae), steps=6)

    ours = generate_latents(model, text, mask, null, null_mask, cfg=4.0, sched=cfg.scheduler,
                            generator=torch.Generator().manual_seed(7), **kwargs)
    pipe = QwenImagePipeline(scheduler=make_scheduler(cfg.scheduler), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=model)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=text, prompt_embeds_mask=mask.long(), negative_prompt_embeds=null.expand(2, -1, -1),
                  negative_prompt_embeds_mask=null_mask.long().expand(2, -1), true_cfg_scale=4.0,
                  num_inference_steps=kwargs["steps"], height=64, width=48,
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    theirs = unpack(theirs, 8, 6)
    assert ours.shape == theirs.shape == (2, cfg.vae.z_dim, 8, 6)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()

    # And the decoded images agree pixel for pixel (within rounding).
    ours_img = generate_images(model, vae, text, mask, null, null_mask, cfg=4.0, sched=cfg.scheduler,
                               generator=torch.Generator().manual_seed(7), **kwargs)
    theirs_img = pipe(prompt_embeds=text, prompt_embeds_mask=mask.long(), negative_prompt_embeds=null.expand(2, -1, -1),
                      negative_prompt_embeds_mask=null_mask.long().expand(2, -1), true_cfg_scale=4.0,
                      num_inference_steps=kwargs["steps"], height=64, width=48,
                      generator=torch.Generator().manual_seed(7), output_type="pt").images
    theirs_pil = to_pil(theirs_img * 2 - 1)
    for a, b in zip(ours_img, theirs_pil):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_cfg_changes_the_result(smoke_config, text_encoder):
    cfg = smoke_config
    torch.manual_seed(0)
    model = build_backbone(cfg.model, cfg.vae.z_dim, cfg.text_encoder.dim).eval()
    text, mask = text_encoder(["a red circle"])
    null, null_mask = text_encoder([""])
    run = lambda scale: generate_latents(model, text, mask, null, null_mask, height=32, width=32,  # noqa
                                         vae_factor=vae_factor(cfg.vae), steps=3,
                                         cfg=scale, sched=cfg.scheduler, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(1.0), run(1.0))
    assert not torch.allclose(run(1.0), run(5.0))
