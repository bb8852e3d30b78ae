"""Small helpers every stage uses: device choice, the text encoder cache, loading upstream outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file



def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: config asks for cuda but no GPU is visible (use --set device=cpu or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_device(cfg) -> torch.device:
    """The device this process trains on: the config's, or under torchrun its own GPU (cuda:LOCAL_RANK)."""
    from kiln import distributed

    return distributed.device_for(pick_device(cfg.device), distributed.ranks())


def starting_weights(cfg, inputs: dict) -> Path | None:
    """What a generator stage starts from: the previous generator stage's output, else the released weights
    model.pretrained names, else nothing (a random init)."""
    if inputs.get("init"):
        return Path(inputs["init"])
    if cfg.model.pretrained:
        from kiln.weights import pretrained_folder

        return pretrained_folder(cfg.model)
    return None


def save_uncond(path: Path, emb: torch.Tensor, mask: torch.Tensor) -> None:
    """The negative/empty prompt's embedding (L, D) and mask (L,), used for caption dropout and CFG."""
    save_file({"text_emb": emb.contiguous().float(), "text_mask": mask.to(torch.uint8).contiguous()}, str(path))


def load_uncond(path: Path, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(path))
    return tensors["text_emb"].to(device), tensors["text_mask"].bool().to(device)


def write_json(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True))


def run_without_orchestration(stages: list[tuple[str, str, dict]], cfg, root: Path, make_tracker=None) -> Path:
    """Run (name, stage module, inputs) in order as plain functions, no Prefect and no MLflow, writing the same
    manifests the flow writes. For tests and benchmarks that need real upstream outputs quickly.
    make_tracker(out_dir) -> Tracker-like object, to keep what the stages log (default: log nothing)."""
    import importlib

    from kiln.stage_io import write_stage_manifest
    from kiln.tracking import Tracker

    for name, module, inputs in stages:
        out_dir = Path(root) / name
        out_dir.mkdir(parents=True, exist_ok=True)
        tracker = make_tracker(out_dir) if make_tracker else Tracker(None)
        result = importlib.import_module(f"stages.{module}").run(cfg, inputs, out_dir, tracker)
        write_stage_manifest(out_dir, stage=name, content_hash=result.content_hash, config=cfg.model_dump(mode="json"),
                             inputs={k: str(v) for k, v in inputs.items()}, metrics=result.metrics)
    return Path(root)


def data_vae_latents(cfg, root: Path) -> Path:
    """data -> vae -> latents under root; returns root."""
    root = Path(root)
    return run_without_orchestration(
        [("data", "data", {}), ("vae", "vae", {"data": root / "data"}),
         ("latents", "latents", {"data": root / "data", "vae": root / "vae"})], cfg, root)
