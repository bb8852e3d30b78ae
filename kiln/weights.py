"""Where a generator's full weights come from: a Kiln checkpoint (whole, sharded, or a LoRA adapter over its base) or
a released checkpoint in diffusers' layout (`model.pretrained`: a local folder, or a hub id the user names).

    load_generator(path, model)   full weights into a plain backbone, whatever kind of source path is
    lora_chain(path)              a LoRA stage's adapters down to the nearest full weights (for export)
    check_pretrained(model_cfg)   before compute: the released weights fit the configured model, key for key
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
# diffusers' file names for a model's weights: one file, or shards listed in an index.
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME as WEIGHTS_INDEX
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME as WEIGHTS_FILE
from safetensors import safe_open
from safetensors.torch import load_file

from kiln.checkpoint import load_weights, resolve_checkpoint
from kiln.geometry import latent_channels


# --- released checkpoints (diffusers layout) -----------------------------------------------------------------------
def pretrained_folder(model_cfg) -> Path:
    """The local folder holding the transformer's weights named by model.pretrained (+ pretrained_subfolder). A hub
    id is downloaded (that subfolder only) because the user named it; a local folder is used as it is."""
    source, sub = model_cfg.pretrained, model_cfg.pretrained_subfolder
    local = Path(source).expanduser()
    if local.exists():
        folder = local / sub if sub else local
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:  # a path, not an "org/name" hub id
        raise FileNotFoundError(f"model.pretrained: {source} does not exist")
    else:
        from huggingface_hub import snapshot_download

        try:
            root = snapshot_download(source, allow_patterns=[f"{sub}/*"] if sub else None)
        except Exception as exc:  # offline, no such repo, no access: one line, the folder kept out of it
            raise FileNotFoundError(f"model.pretrained: {source} is not a local folder and could not be fetched "
                                    f"as a hub id ({type(exc).__name__})") from None
        folder = Path(root) / sub if sub else Path(root)
    if not ((folder / WEIGHTS_FILE).exists() or (folder / WEIGHTS_INDEX).exists()):
        raise FileNotFoundError(f"model.pretrained: no {WEIGHTS_FILE} (or its index) in {folder} "
                                f"(model.pretrained_subfolder={sub!r})")
    return folder


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_INDEX).exists():
        index = json.loads((folder / WEIGHTS_INDEX).read_text())
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    return [folder / WEIGHTS_FILE]


def pretrained_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers, without reading the weights."""
    shapes = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """What differs between a model's state shapes and a checkpoint's, in one line (None: they match)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} (model {expected[k]})" for k in sorted(set(expected) & set(found))
             if tuple(found[k]) != tuple(expected[k])]
    parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
             f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:3])})" if wrong else ""]
    parts = [p for p in parts if p]
    return "; ".join(parts) if parts else None


def check_pretrained(cfg) -> Path:
    """Before compute: model.pretrained's tensors are exactly the configured model's, names and shapes (a one-line
    ValueError naming the differences otherwise). Returns the weights folder."""
    from kiln.models import build_backbone

    folder = pretrained_folder(cfg.model)
    model = build_backbone(cfg.model, latent_channels(cfg.vae), cfg.text_encoder.dim, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = mismatch(expected, pretrained_shapes(folder))
    if problem:
        raise ValueError(f"model.pretrained: {folder} does not fit the configured {cfg.model.kind} model: {problem}")
    return folder


def pretrained_fingerprint(cfg) -> str:
    """What a cache key needs of the released weights without hashing gigabytes: each weight file's name, size and
    modification time (a hub download's path also names its commit)."""
    folder = pretrained_folder(cfg.model)
    return json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in _weight_files(folder)])


def load_pretrained(folder: Path, model: torch.nn.Module) -> None:
    state = {}
    for file in _weight_files(Path(folder)):
        state.update(load_file(str(file)))
    problem = mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                       {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise ValueError(f"model.pretrained: {folder} does not fit the model: {problem}")
    model.load_state_dict(state)


# --- Kiln checkpoints --------------------------------------------------------------------------------------------
def checkpoint_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def lora_base(ckpt: Path, meta: dict) -> tuple[Path, str]:
    """A LoRA checkpoint's base: (folder, which weights), stored relative to the checkpoint so a moved run folder
    still resolves."""
    return (Path(ckpt) / meta["base"]["path"]).resolve(), meta["base"]["which"]


def base_record(ckpt_dir: Path, base: Path, which: str) -> dict:
    """meta.json's "base" entry for an adapter checkpointed under ckpt_dir/step-N over `base`."""
    return {"path": os.path.relpath(Path(base).resolve(), (Path(ckpt_dir) / "step-0").resolve()), "which": which}


def is_diffusers_folder(path: Path) -> bool:
    path = Path(path)
    return (path / WEIGHTS_FILE).exists() or (path / WEIGHTS_INDEX).exists()


def load_generator(path: Path, model: torch.nn.Module, which: str = "ema") -> None:
    """Full weights into a plain backbone from `path`: a diffusers weights folder, or a Kiln stage output or
    checkpoint (its `which` weights, "ema" or "model", falling back to "model" where there is no EMA). A LoRA
    checkpoint loads its base first (recursively), then fuses its adapter in."""
    path = Path(path)
    if is_diffusers_folder(path):
        load_pretrained(path, model)
        return
    ckpt = resolve_checkpoint(path)
    which = which if (ckpt / f"{which}.safetensors").exists() or (ckpt / which).is_dir() else "model"
    meta = checkpoint_meta(ckpt)
    if meta.get("kind") != "lora":
        load_weights(ckpt, model, which)
        return
    from kiln.adapters import fuse_adapter
    from kiln.config import LoraSettings

    base, base_which = lora_base(ckpt, meta)
    load_generator(base, model, base_which)
    fuse_adapter(model, LoraSettings(**meta["lora"]), load_file(str(ckpt / f"{which}.safetensors")))


def lora_chain(path: Path, which: str = "ema") -> tuple[Path, str, list[tuple[object, dict]]]:
    """(the nearest full-weights source, its `which`, [(lora settings, adapter tensors), ...] first to last) for a
    stage output or checkpoint; the list is empty for a full-weight stage."""
    from kiln.config import LoraSettings

    chain = []
    path = Path(path)
    while not is_diffusers_folder(path):
        ckpt = resolve_checkpoint(path)
        meta = checkpoint_meta(ckpt)
        if meta.get("kind") != "lora":
            break
        own = which if (ckpt / f"{which}.safetensors").exists() else "model"
        chain.insert(0, (LoraSettings(**meta["lora"]), load_file(str(ckpt / f"{own}.safetensors"))))
        path, which = lora_base(ckpt, meta)
    return path, which, chain
