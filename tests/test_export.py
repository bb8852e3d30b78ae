"""`kiln export`: a diffusers folder that QwenImagePipeline.from_pretrained loads and that draws what kiln draws."""

import json
import subprocess
import sys

import numpy as np
import torch
from diffusers import QwenImagePipeline

from kiln.config import TextEncoderConfig, load_config
from kiln.generate import to_pil
from kiln.text_encoder import build_text_encoder
from kiln.vae import vae_for
from stages.common import run_without_orchestration
from stages.sampling import generate_for_captions, load_stage


def test_export_loads_in_diffusers_and_draws_the_same_image(smoke_latents, tmp_path):
    cfg = load_config("smoke", ["train.rungs.0.steps=3"])
    inputs = {"latents": smoke_latents / "latents", "vae": smoke_latents / "vae"}
    run_without_orchestration([("pretrain", "pretrain", inputs)], cfg, tmp_path)
    out = tmp_path / "exported"
    result = subprocess.run([sys.executable, "-m", "kiln_cli", "export", "--from", str(tmp_path / "pretrain"),
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {"model_index.json", "transformer", "vae", "scheduler", "kiln.json"} <= {p.name for p in out.iterdir()}

    pipe = QwenImagePipeline.from_pretrained(out, text_encoder=None, tokenizer=None)  # referenced in kiln.json
    pipe.set_progress_bar_config(disable=True)
    meta = json.loads((out / "kiln.json").read_text())
    encoder = build_text_encoder(TextEncoderConfig(**meta["text_encoder"]))
    captions = ["a red circle", "two blue squares"]
    text, mask = encoder(captions)
    null, null_mask = encoder([meta["sampler"]["negative_prompt"]])
    theirs = pipe(prompt_embeds=text, prompt_embeds_mask=mask.long(), negative_prompt_embeds=null.expand(2, -1, -1),
                  negative_prompt_embeds_mask=null_mask.long().expand(2, -1), true_cfg_scale=4.0,
                  num_inference_steps=5, height=32, width=32, generator=torch.Generator().manual_seed(3),
                  output_type="pt").images
    stage_cfg, model, vae_dir, _ = load_stage(tmp_path / "pretrain")
    ours = generate_for_captions(stage_cfg, model, vae_for(stage_cfg, vae_dir, "cpu"), captions, width=32,
                                 height=32, steps=5, cfg_scale=4.0, seed=3)
    for a, b in zip(ours, to_pil(theirs * 2 - 1)):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1

    again = subprocess.run([sys.executable, "-m", "kiln_cli", "export", "--from", str(tmp_path / "pretrain"),
                            "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip() == f"kiln: error: export: {out} exists and is not empty; choose a new --out folder"
