"""LoRA against full fine-tuning of the same model: step time and peak memory, measured in one run.

Each variant runs in its own process (peak resident memory is per process), twice, alternating (full, lora, full,
lora), so a drift in this machine's speed hits both. A step is the flow-matching loss step the pretrain rungs and SFT
run, with AdamW; LoRA trains the adapter of `lora.*` (kiln/adapters.py) over the frozen model. Prints the medians and
the ratios.

    python benchmarks/lora.py --preset tiny --resolution 128 --batch 32 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(preset: str, overrides: list[str], resolution: int, batch: int, steps: int, lora: bool) -> dict:
    import torch

    from kiln.adapters import attach_lora
    from kiln.config import load_config
    from kiln.flow import velocity_errors
    from kiln.geometry import latent_channels, token_grid, vae_factor
    from kiln.models import build_backbone, pack
    from kiln.trainer import build_optimizer

    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_backbone(cfg.model, latent_channels(cfg.vae), cfg.text_encoder.dim)
    if lora:
        attach_lora(model, cfg.lora)
    optimizer, _ = build_optimizer(model, 1e-4)
    side = resolution // vae_factor(cfg.vae)
    latents = torch.randn(batch, latent_channels(cfg.vae), side, side)
    text = torch.randn(batch, 16, cfg.text_encoder.dim)
    mask = torch.ones(batch, 16, dtype=torch.bool)
    grid = token_grid(side, side)

    def step():
        optimizer.zero_grad(set_to_none=True)
        t = torch.rand(batch)
        loss = velocity_errors(model, pack(latents), pack(torch.randn_like(latents)), t, text, mask, grid).mean()
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up: allocator, optimizer state
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    return {"step_s": seconds, "peak_rss_mb": peak_mb, "trainable": trainable,
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.overrides, args.resolution, args.batch, args.steps,
                                 args.child == "lora")))
        return
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.repeats):
        for variant in ("full", "lora"):
            command = [sys.executable, __file__, "--child", variant, "--preset", args.preset, "--resolution",
                       str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps),
                       *[a for s in args.overrides for a in ("--set", s)]]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
    print(f"preset {args.preset}, {args.resolution} px, batch {args.batch}, {args.steps} steps x {args.repeats} "
          f"alternating runs per variant (medians)")
    print("| variant | trainable parameters | step time (s) | peak resident memory (MB) |")
    print("|---|---|---|---|")
    for variant, m in med.items():
        print(f"| {variant} | {int(m['trainable']):,} of {int(m['parameters']):,} | {m['step_s']:.4f} | "
              f"{m['peak_rss_mb']:.0f} |")
    print(f"lora / full: step time {med['lora']['step_s'] / med['full']['step_s']:.3f}, peak memory "
          f"{med['lora']['peak_rss_mb'] / med['full']['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
