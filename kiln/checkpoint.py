"""Checkpoints written atomically and loaded without pickle.

checkpoints/step-N/
  model.safetensors, ema.safetensors   weights (safetensors)
  trainer.pt                           optimizer, LR schedule, step, RNG state, data position
                                       (torch.save; loaded with weights_only=True)
  meta.json                            step and anything JSON-able
Written to checkpoints/.tmp-step-N and renamed, so a crash never leaves a half checkpoint under a final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(ckpt_dir: Path, step: int, model, ema=None, trainer_state: dict | None = None,
                    meta: dict | None = None, keep: int = 2) -> Path:
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_state(ema), str(tmp / "ema.safetensors"))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load_weights(path: Path, module: torch.nn.Module, which: str = "model") -> None:
    """Load model.safetensors or ema.safetensors into module (strict)."""
    file = Path(path) / f"{which}.safetensors"
    if not file.exists():
        raise FileNotFoundError(f"checkpoint: no {file.name} in {path}")
    module.load_state_dict(load_file(str(file)))


def load_trainer_state(path: Path) -> dict:
    return torch.load(Path(path) / "trainer.pt", weights_only=True, map_location="cpu")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a checkpoints/ folder, or a stage output folder -> the checkpoint folder to load."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if (path / "model.safetensors").exists():
        return path
    for candidate in (path / "final", path / "checkpoints"):
        if (candidate / "model.safetensors").exists():
            return candidate
        if candidate.is_dir() and latest_checkpoint(candidate):
            return latest_checkpoint(candidate)
    if latest_checkpoint(path):
        return latest_checkpoint(path)
    raise FileNotFoundError(f"checkpoint: no model.safetensors under {path} (expected a stage output or checkpoint folder)")
