"""`kiln export`: a diffusers folder that QwenImagePipeline.from_pretrained loads and that draws what kiln draws."""

import subprocess
import sys

import numpy as np

from kiln.config import load_config
from kiln.generate import to_pil
from kiln.vae import vae_for
from stages.common import run_without_orchestration
from stages.sampling import generate_for_captions, load_stage
from conftest import draw_with_diffusers


def test_export_loads_in_diffusers_and_draws_the_same_image(smoke_latents, tmp_path):
    cfg = load_config("smoke", ["train.rungs.0.steps=3"])
    inputs = {"latents": smoke_latents / "latents", "vae": smoke_latents / "vae"}
    run_without_orchestration([("pretrain", "pretrain", inputs)], cfg, tmp_path)
    out = tmp_path / "exported"
    result = subprocess.run([sys.executable, "-m", "kiln_cli", "export", "--from", str(tmp_path / "pretrain"),
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {"model_index.json", "transformer", "vae", "scheduler", "kiln.json"} <= {p.name for p in out.iterdir()}

    captions = ["a red circle", "two blue squares"]
    _, theirs = draw_with_diffusers(out, captions, 32)  # the text encoder is referenced in kiln.json
    stage_cfg, model, vae_dir, _ = load_stage(tmp_path / "pretrain")
    ours = generate_for_captions(stage_cfg, model, vae_for(stage_cfg, vae_dir, "cpu"), captions, width=32,
                                 height=32, steps=5, cfg_scale=4.0, seed=3)
    for a, b in zip(ours, to_pil(theirs * 2 - 1)):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1

    again = subprocess.run([sys.executable, "-m", "kiln_cli", "export", "--from", str(tmp_path / "pretrain"),
                            "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip() == f"kiln: error: export: {out} exists and is not empty; choose a new --out folder"
