"""LoRA adapters on the generator through PEFT, the library diffusers itself uses for adapters.

A LoRA stage freezes the weights it starts from (its base: the previous stage's weights, or `model.pretrained`) and
trains rank-r matrices A (r, in) and B (out, r) beside each targeted Linear layer: W x + (alpha / r) B A x. B starts at
zero, so the stage starts exactly at its base. Its checkpoints hold the adapter, the adapter's EMA and the optimizer
state over the adapter only, plus (meta.json) where its base is; `kiln.weights.load_generator` rebuilds the full
weights (base, then the adapter fused in) wherever a later stage, eval or export reads them.

DPO's and GRPO's frozen reference is the policy itself with its adapter disabled (`adapter_disabled`), not a second
copy of the model: the base is the stage's starting point, which is what the reference must be.
Pure torch + PEFT/diffusers: no Prefect, no MLflow.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a target given as a string in a list: the module's name is it or ends with "." + it."""
    return name == target or name.endswith("." + target)


def layer_kinds(model: torch.nn.Module) -> list[str]:
    """The model's Linear layers named without their block index ("attn.to_q", not "transformer_blocks.3.attn.to_q"):
    what a target module can name, for error messages."""
    return sorted({re.sub(r"^\w+\.\d+\.", "", name) for name in linear_layers(model)})


def check_lora(model: torch.nn.Module, lcfg) -> None:
    """Before compute: every target names at least one Linear layer of `model`, and the rank fits each of them.
    One-line ValueError naming what is wrong and what exists."""
    layers = linear_layers(model)
    for target in lcfg.target_modules:
        matched = {name: layer for name, layer in layers.items() if _matches(name, target)}
        if not matched:
            raise ValueError(f"lora.target_modules: {target!r} names no Linear layer of this {type(model).__name__} "
                             f"(its Linear layers: {', '.join(layer_kinds(model))})")
        for name, layer in matched.items():
            if lcfg.rank > min(layer.in_features, layer.out_features):
                raise ValueError(f"lora.rank {lcfg.rank} does not fit {name} ({layer.in_features} -> "
                                 f"{layer.out_features} features): use a rank of at most "
                                 f"{min(layer.in_features, layer.out_features)}")


def peft_config(lcfg):
    from peft import LoraConfig

    return LoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                      target_modules=list(lcfg.target_modules), init_lora_weights=True)  # B = 0: starts at the base


def attach_lora(model: torch.nn.Module, lcfg) -> torch.nn.Module:
    """Freeze model and add a trainable adapter (in place; returns model). A's initialisation draws from torch's
    global RNG: seed it first for a reproducible stage."""
    check_lora(model, lcfg)
    model.requires_grad_(False)
    model.add_adapter(peft_config(lcfg))  # diffusers' PeftAdapterMixin: only the adapter requires grad
    return model


def has_adapter(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, by name (an adapter's: "...to_q.lora_A.default.weight")."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


class AdapterWeights:
    """A model's adapter seen as a module's weights: state_dict() holds only the trainable tensors, and
    load_state_dict() fills exactly those (strict on their names). What a LoRA trainer checkpoints as its model."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.tensors = trainable(model)

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(self.tensors.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.tensors.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.tensors) - set(state)), sorted(set(state) - set(self.tensors))
        if missing or unexpected:
            raise ValueError(f"adapter checkpoint does not match the adapter: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]} (was it written with other lora settings?)")
        for name, param in self.tensors.items():
            param.copy_(state[name])


class AdapterEMA(AdapterWeights):
    """The EMA of an adapter: copies of the trainable tensors only, never of the frozen base (which would double the
    weight memory of a 20B model for nothing)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.tensors = {name: param.detach().clone() for name, param in trainable(model).items()}

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[torch.nn.Module]:
        """The model with the EMA adapter in place of the trained one, in eval mode (no LoRA dropout), for
        sampling; the trained adapter and the mode come back afterwards."""
        live = trainable(self.model)
        saved = {name: param.detach().clone() for name, param in live.items()}
        was_training = self.model.training
        with torch.no_grad():
            for name, param in live.items():
                param.copy_(self.tensors[name])
        self.model.eval()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for name, param in live.items():
                    param.copy_(saved[name])
            self.model.train(was_training)


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


class BaseModel(torch.nn.Module):
    """The frozen reference of a LoRA policy: calls the policy's network with the adapter switched off, so the
    reference costs no second copy of the weights. Call it under torch.no_grad()."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = [policy]  # a list, so the policy's parameters are not registered twice

    def forward(self, *args, **kwargs):
        with adapter_disabled(self.policy[0]) as base:
            return base(*args, **kwargs)


@torch.no_grad()
def fuse_adapter(model: torch.nn.Module, lcfg, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """W <- W + (alpha / r) B A for an adapter's tensors `state` (trainable names), in place; the model comes back
    a plain backbone with its requires_grad flags as they were."""
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    attach_lora(model, lcfg)
    AdapterWeights(model).load_state_dict(state)
    model.fuse_lora()
    model.unload_lora()  # drops the LoRA layers, keeping the fused weights
    for name, param in model.named_parameters():
        param.requires_grad_(flags[name])
    return model


def diffusers_lora_layers(chain: list[tuple[object, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """One adapter in the layout `QwenImagePipeline.save_lora_weights` writes (PEFT names without the adapter name,
    "transformer_blocks.0.attn.to_q.lora_A.weight"), equal to applying the adapters of `chain` (lora settings,
    trainable state), first to last, on the base they all sit on.

    Adapters that follow each other add: W + s1 B1 A1 + s2 B2 A2 = W + [s1 B1, s2 B2] [A1; A2], an adapter of rank
    r1 + r2 whose scale is folded into B, so it is written with alpha = rank (what loaders assume when no alpha is
    stored). A layer one adapter leaves alone gets zero rows there."""
    def part(state, layer, which):  # (r, in) for lora_A, (out, r) for lora_B, or None where the adapter skips it
        return next((v.float() for k, v in state.items() if k.startswith(f"{layer}.{which}.")), None)

    layers = sorted({name.split(".lora_A.")[0] for _, state in chain for name in state if ".lora_A." in name})
    out = {}
    for layer in layers:
        found = next((lcfg, state) for lcfg, state in chain if part(state, layer, "lora_A") is not None)[1]
        n_out, n_in = part(found, layer, "lora_B").shape[0], part(found, layer, "lora_A").shape[1]
        a_parts, b_parts = [], []
        for lcfg, state in chain:
            a, b = part(state, layer, "lora_A"), part(state, layer, "lora_B")
            a_parts.append(a if a is not None else torch.zeros(lcfg.rank, n_in))
            b_parts.append(b * (lcfg.alpha / lcfg.rank) if b is not None else torch.zeros(n_out, lcfg.rank))
        out[f"{layer}.lora_A.weight"] = torch.cat(a_parts).contiguous()  # (sum r, in)
        out[f"{layer}.lora_B.weight"] = torch.cat(b_parts, dim=1).contiguous()  # (out, sum r)
    return out
