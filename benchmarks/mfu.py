"""Training-step throughput and model FLOP utilisation (MFU) of a preset's transformer on the current device.

FLOPs are counted, not estimated: torch.utils.flop_counter counts one full training step (forward + backward of
the flow-matching loss) on the real model, so attention, the projections and the modulation layers are all in.
MFU = model FLOPs per second / the chip's peak dense bf16 rate (or --peak-tflops); model FLOPs are counted with
gradient checkpointing off. HFU also counts the forward that checkpointing recomputes (equal to MFU without it).

python benchmarks/mfu.py --preset small --resolution 256 --batch 32
python benchmarks/mfu.py --preset tiny --resolution 128 --batch 16 --precision fp32 --compile   # torch.compile's gain
python benchmarks/mfu.py --preset qwen-image --set model.num_layers=4 --resolution 1328 --batch 1
    # the published 3072-wide block at full resolution; 4 of its 60 blocks fit one GPU with AdamW state

Inputs are random latents and random text embeddings of the preset's shapes: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.config import load_config
from kiln.diffusion import diffusion_loss
from kiln.geometry import latent_channels, vae_factor
from kiln.models import build_backbone, count_parameters

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--peak-tflops", type=float, help="the chip's peak rate (default: table by GPU name)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (one graph per input shape; compile_s reports the first)")
    args = parser.parse_args()

    cfg = load_config(args.preset, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_backbone(cfg.model, latent_channels(cfg.vae), cfg.text_encoder.dim, device=device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    side = args.resolution // vae_factor(cfg.vae)  # latents per image side
    latents = torch.randn(args.batch, latent_channels(cfg.vae), side, side, device=device)  # (B, C, H/8, W/8)
    text = torch.randn(args.batch, args.text_tokens, cfg.text_encoder.dim, device=device)  # (B, L, D)
    mask = torch.ones(args.batch, args.text_tokens, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    forward = torch.compile(model, dynamic=False) if args.compile else model

    def step(net=forward):
        with autocast:
            loss, _, _ = diffusion_loss(net, latents, text, mask, cfg.objective, cfg.scheduler, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def counted_flops() -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            step(model)  # eager: the count does not depend on compilation
        return counter.get_total_flops()

    compile_s = None
    if args.compile:  # the first call traces and compiles; eager runs keep their old warm-up
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
    hardware_flops = counted_flops()  # as configured (with checkpointing: the recomputed forward too)
    if cfg.model.gradient_checkpointing:
        model.disable_gradient_checkpointing()
        flops_per_step = counted_flops()
        model.enable_gradient_checkpointing()
    else:
        flops_per_step = hardware_flops
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the count without checkpointing must not set the peak
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    achieved = flops_per_step / seconds / 1e12
    peak = peak_tflops(device, args.peak_tflops)
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": args.preset, "overrides": args.overrides, "parameters": count_parameters(model),
        "resolution": args.resolution, "batch": args.batch, "image_tokens": (side // cfg.model.patch_size) ** 2,
        "precision": args.precision, "compiled": args.compile,
        "compile_s": compile_s and round(compile_s, 1), "step_s": round(seconds, 4),
        "images_per_s": round(args.batch / seconds, 2),
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "model_tflops_per_step": round(flops_per_step / 1e12, 3), "model_tflops_per_s": round(achieved, 2),
        "mfu": round(achieved / peak, 4) if peak else None,
        "hfu": round(hardware_flops / seconds / 1e12 / peak, 4) if peak else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    print("mfu", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
