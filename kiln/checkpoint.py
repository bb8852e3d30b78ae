"""Checkpoints written atomically and loaded without pickle.

checkpoints/step-N/
  model.safetensors, ema.safetensors   weights (safetensors)
  trainer.pt                           optimizer, LR schedule, step, RNG state, data position
                                       (torch.save; loaded with weights_only=True)
  meta.json                            step and anything JSON-able
Written to checkpoints/.tmp-step-N and renamed, so a crash never leaves a half checkpoint under a final name.

Sharded (FSDP2, several processes): model/, ema/ and optimizer/ folders in place of the first two files, each rank
writing its own shards through torch.distributed.checkpoint as safetensors files whose headers carry the sharding
(HuggingFaceStorageWriter: no pickled metadata). They load into any number of processes, one included: DCP
reshards on load. A consolidated (final) sharded checkpoint also holds the whole model.safetensors and ema.safetensors.
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


def whole_state(weights) -> dict[str, torch.Tensor]:
    """The whole tensors of a module or of an adapter view (kiln/adapters.py), gathered from FSDP2 shards when
    sharded. Collective under FSDP2 (every rank calls it); the result is on the CPU."""
    from torch.distributed.tensor import DTensor

    if isinstance(weights, torch.nn.Module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(weights, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in weights.state_dict().items()}


def load_weights(path: Path, module, which: str = "model") -> None:
    """Load model.safetensors or ema.safetensors (or their sharded folders) into module (strict); the module (or an
    adapter view, kiln/adapters.py) may itself be sharded (FSDP2)."""
    from kiln.distributed import is_sharded

    file, shards = Path(path) / f"{which}.safetensors", Path(path) / which
    if file.exists():
        state = load_file(str(file))
        if is_sharded(module) and isinstance(module, torch.nn.Module):  # every rank reads the file, keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
        elif is_sharded(module):  # an adapter view: each whole tensor cut like its DTensor
            from torch.distributed.tensor import distribute_tensor

            live = module.state_dict()
            module.load_state_dict({k: distribute_tensor(v.to(live[k].device), live[k].device_mesh, live[k].placements)
                                    if k in live else v for k, v in state.items()})
        else:
            module.load_state_dict(state)
    elif shards.is_dir():
        import torch.distributed.checkpoint as dcp

        state = module.state_dict()  # DTensor shards or whole tensors: DCP reads the slices each one needs
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(shards)))
        module.load_state_dict(state)
    else:
        raise FileNotFoundError(f"checkpoint: no {file.name} (or sharded {which}/) in {path}")


def save_sharded_checkpoint(ckpt_dir: Path, step: int, model, ema, optimizer, trainer_state: dict, meta: dict,
                            keep: int = 2, consolidate: bool = False, weights=None) -> Path:
    """Collective (every rank calls it): FSDP2 model, EMA and optimizer shards, plus rank 0's trainer.pt and
    meta.json. consolidate: also gather the whole model and EMA into rank 0's model/ema.safetensors (a stage's
    final checkpoint, which later stages and `kiln export` read as usual). weights: what is saved as the model (an
    adapter view of `model` for a LoRA stage; default the model)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from kiln.distributed import barrier, ranks

    main = ranks().is_main
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f".tmp-step-{step}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    optim_state = get_optimizer_state_dict(model, optimizer)  # {"state": {fqn: {name: tensor}}, "param_groups": [...]}
    flat_optim = {f"{fqn}.{name}": value for fqn, entries in optim_state["state"].items()
                  for name, value in entries.items()}
    modules = [("model", model if weights is None else weights)] + ([("ema", ema)] if ema is not None else [])
    for name, state in [*((n, m.state_dict()) for n, m in modules), ("optimizer", flat_optim)]:
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / name), save_distributed=True))
    if consolidate:
        for name, module in modules:
            state = whole_state(module)  # gathered on rank 0 (a module's is empty elsewhere)
            if main:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"{name}.safetensors"))
    if main:
        torch.save({**trainer_state, "param_groups": optim_state["param_groups"]}, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "sharded_over": ranks().world_size, **meta}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / "optimizer").is_dir()


def load_sharded_optimizer(path: Path, model, optimizer, param_groups: list[dict]) -> None:
    """Optimizer state from a sharded checkpoint into `optimizer` over `model` (sharded or whole)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    reader = dcp.HuggingFaceStorageReader(str(Path(path) / "optimizer"))
    saved = set(reader.read_metadata().state_dict_metadata)
    template = get_optimizer_state_dict(model, optimizer)  # initialises the state: tensors of the right shapes
    # Parameters that never had a gradient (the last block's unused text outputs) have no state in the checkpoint.
    template_state = {fqn: entries for fqn, entries in template["state"].items()
                      if all(f"{fqn}.{name}" in saved for name in entries)}
    flat = {f"{fqn}.{name}": value for fqn, entries in template_state.items() for name, value in entries.items()}
    dcp.load(flat, storage_reader=reader)
    state = {fqn: {name: flat[f"{fqn}.{name}"] for name in entries} for fqn, entries in template_state.items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": param_groups},
                             options=StateDictOptions(strict=False))  # strict would demand state for those too


def load_trainer_state(path: Path) -> dict:
    return torch.load(Path(path) / "trainer.pt", weights_only=True, map_location="cpu")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a checkpoints/ folder, or a stage output folder -> the checkpoint folder to load."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if (path / "model.safetensors").exists() or (path / "model").is_dir() and (path / "meta.json").exists():
        return path
    for candidate in (path / "final", path / "checkpoints"):
        if (candidate / "model.safetensors").exists():
            return candidate
        if candidate.is_dir() and latest_checkpoint(candidate):
            return latest_checkpoint(candidate)
    if latest_checkpoint(path):
        return latest_checkpoint(path)
    raise FileNotFoundError(f"checkpoint: no model.safetensors under {path} (expected a stage output or checkpoint folder)")


def save_training_state(ckpt_dir: Path, step: int, model, ema, optimizer, state: dict, meta: dict, keep: int,
                        sharded: bool, final: bool = False, weights=None) -> Path:
    """A trainer's checkpoint, collective under torchrun: sharded (FSDP2, every rank; a final one also whole
    weights), else whole files from rank 0 while the others wait. `state` holds the trainer's own non-tensor state
    (schedule, step, RNG, data position); the optimizer goes in here. weights: what is saved as the model (an
    adapter view for a LoRA stage; default the model)."""
    from kiln.distributed import barrier, ranks

    ckpt_dir = Path(ckpt_dir)
    if sharded:
        return save_sharded_checkpoint(ckpt_dir, step, model, ema, optimizer, state, meta, keep, consolidate=final,
                                       weights=weights)
    if ranks().is_main:
        save_checkpoint(ckpt_dir, step, model if weights is None else weights, ema,
                        {**state, "optimizer": optimizer.state_dict()}, meta=meta, keep=keep)
    barrier()
    return ckpt_dir / f"step-{step}"


def load_training_state(ckpt: Path, model, ema, optimizer, param_names: list[str], sharded: bool,
                        weights=None) -> dict:
    """Weights (model, and EMA when given) and optimizer state from a whole or a sharded checkpoint into a model
    that is whole or sharded, under any number of processes. param_names: the optimizer's parameters in order (what
    a whole checkpoint's state indices refer to). weights: what the checkpoint holds as the model (an adapter view
    for a LoRA stage; default the model). Returns the trainer state (trainer.pt)."""
    load_weights(ckpt, model if weights is None else weights, "model")
    if ema is not None:
        load_weights(ckpt, ema, "ema")
    state = load_trainer_state(ckpt)
    if is_sharded_checkpoint(ckpt):
        load_sharded_optimizer(ckpt, model, optimizer, state["param_groups"])
    elif sharded:  # whole optimizer state into FSDP2 shards: index -> parameter name, then DCP's loader
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        whole = state["optimizer"]
        by_name = {"state": {param_names[i]: v for i, v in whole["state"].items()},
                   "param_groups": [{**g, "params": [param_names[i] for i in g["params"]]}
                                    for g in whole["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    return state


def save_network(out_dir: Path, stem: str, module: torch.nn.Module, arch: dict) -> None:
    """A small network that is a stage's whole output (reward model, feature network): STEM.safetensors holds its
    weights, STEM.json the arguments that build it."""
    save_file(_state(module), str(Path(out_dir) / f"{stem}.safetensors"))
    (Path(out_dir) / f"{stem}.json").write_text(json.dumps(arch, indent=1))


def load_network(out_dir: Path, stem: str, build, stage: str, device="cpu") -> torch.nn.Module:
    """What save_network wrote, rebuilt with build(arch) -> module: frozen, in eval mode, on device."""
    arch_file = Path(out_dir) / f"{stem}.json"
    if not arch_file.exists():
        raise FileNotFoundError(f"{stage}: no {stem} at {out_dir} ({arch_file.name} missing): run the {stage} "
                                f"stage first")
    module = build(json.loads(arch_file.read_text()))
    module.load_state_dict(load_file(str(Path(out_dir) / f"{stem}.safetensors")))
    return module.to(device).eval().requires_grad_(False)
