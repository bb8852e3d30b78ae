"""Test setup: MLflow and Prefect point at a temporary folder; one Prefect test server for the whole session."""

import os
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="kiln-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_TMP / "prefect"))
# Prefect reads its settings when first imported. No usage heartbeat: offline it logs "Failed to send telemetry" as an
# ERROR (the CLI sets the same default, kiln_cli/main.py).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TMP / 'mlflow.db'}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["HF_DATASETS_CACHE"] = str(_TMP / "hf-datasets")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def smoke_config():
    from kiln.config import load_config

    return load_config("smoke")


@pytest.fixture(scope="session")
def smoke_latents(tmp_path_factory):
    """data -> vae -> latents on the smoke preset, as plain functions (no Prefect, no MLflow)."""
    from kiln.config import load_config
    from stages.common import data_vae_latents

    return data_vae_latents(load_config("smoke"), tmp_path_factory.mktemp("stages"))


@pytest.fixture(scope="session")
def text_encoder(smoke_config):
    from kiln.text_encoder import build_text_encoder

    return build_text_encoder(smoke_config.text_encoder)


def write_pickapic_parquet(path: Path, n: int = 12, seed: int = 0) -> Path:
    """A tiny preference dataset in Pick-a-Pic's layout: caption, jpg_0, jpg_1 (encoded images), label_0 (1: image 0
    preferred, 0: image 1, 0.5: tie). The preferred image renders the caption; the other renders another scene."""
    import io
    import random

    import pandas as pd

    from data.synthetic import caption, make_holdout, render, sample_spec

    rng, holdout, rows = random.Random(seed), make_holdout(1234), []
    for i in range(n):
        spec, other = (sample_spec(rng, holdout, "train", "single") for _ in range(2))
        good, bad = render(spec, 80, 64, rng)[0], render(other, 64, 64, rng)[0]
        label = (1.0, 0.0, 0.5)[i % 3]
        first, second = (good, bad) if label >= 0.5 else (bad, good)
        cells = []
        for image in (first, second):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            cells.append(buffer.getvalue())
        rows.append({"caption": caption(spec, rng), "jpg_0": cells[0], "jpg_1": cells[1], "label_0": label})
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="session")
def pickapic_parquet(tmp_path_factory):
    return write_pickapic_parquet(tmp_path_factory.mktemp("pickapic") / "pairs.parquet")


@pytest.fixture
def crash_at(monkeypatch):
    """crash_at(step): the next training stage raises "simulated crash" when its trainer reaches `step` (after the
    checkpoints before it are written); monkeypatch.undo() disarms it."""
    from kiln.trainer import Trainer

    def arm(step: int) -> None:
        original = Trainer.train_step

        def crashing(self, *args, **kwargs):
            if self.step == step:
                raise RuntimeError("simulated crash")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, "train_step", crashing)

    return arm


def draw_with_diffusers(folder: Path, captions: list[str], size: int, lora: bool = False):
    """(pipeline, images (B, 3, size, size) in [0, 1]) from an exported folder through diffusers' QwenImagePipeline,
    the way a user loads it: captions encoded with the text encoder kiln.json names, true CFG 4, 5 steps, seed 3;
    lora: pipe.load_lora_weights(folder) first."""
    import json

    import torch
    from diffusers import QwenImagePipeline

    from kiln.config import TextEncoderConfig
    from kiln.text_encoder import build_text_encoder

    pipe = QwenImagePipeline.from_pretrained(folder, text_encoder=None, tokenizer=None)
    if lora:
        pipe.load_lora_weights(folder)
    pipe.set_progress_bar_config(disable=True)
    meta = json.loads((Path(folder) / "kiln.json").read_text())
    encoder = build_text_encoder(TextEncoderConfig(**meta["text_encoder"]))
    text, mask = encoder(captions)
    null, null_mask = encoder([meta["sampler"]["negative_prompt"]])
    n = len(captions)
    return pipe, pipe(prompt_embeds=text, prompt_embeds_mask=mask.long(), negative_prompt_embeds=null.expand(n, -1, -1),
                      negative_prompt_embeds_mask=null_mask.long().expand(n, -1), true_cfg_scale=4.0,
                      num_inference_steps=5, height=size, width=size, generator=torch.Generator().manual_seed(3),
                      output_type="pt").images
