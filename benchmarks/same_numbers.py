"""Are two pipeline runs numerically the same? Compares every eval stage's metrics (from each stage's manifest.json)
and every training stage's final weights (tensor by tensor) of two run folders, e.g. one made by the code before a
refactor and one after it, with the same config on the same machine.

    python benchmarks/same_numbers.py BEFORE_RUN_DIR AFTER_RUN_DIR

Prints the held-out table of both runs, then one line per stage: identical, or what differs. Exit code 1 if a shared
metric or a stage's weights differ, or a metric of the first run is missing from the second (new metrics are listed). Timing metrics (seconds, images per second) are left out: they measure the machine, not the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HELDOUT = ("eval/heldout/single/colour_shape", "eval/heldout/count/count", "eval/heldout/relation/relation",
           "eval/heldout/all/score")
TIMING = ("seconds", "images_per_s", "per_s")


def eval_metrics(run: Path) -> dict[str, dict[str, float]]:
    out = {}
    for manifest in sorted(run.glob("eval-*/manifest.json")):
        metrics = json.loads(manifest.read_text()).get("metrics", {})
        out[manifest.parent.name] = {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}
    return out


def final_weights(stage: Path) -> dict[str, torch.Tensor] | None:
    """The stage's final checkpoint's model weights (the highest step), or None."""
    steps = sorted(stage.glob("checkpoints/step-*/model.safetensors"), key=lambda p: int(p.parent.name[5:]))
    return load_file(str(steps[-1])) if steps else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = eval_metrics(args.before), eval_metrics(args.after)
    print("| stage | " + " | ".join(k.removeprefix("eval/heldout/") for k in HELDOUT) + " |")
    print("|---|" + "---|" * len(HELDOUT))
    for name in before:
        for label, run in (("before", before), ("after", after)):
            values = [run.get(name, {}).get(k) for k in HELDOUT]
            cells = " | ".join("-" if v is None else f"{v:.3f}" for v in values)
            print(f"| {name.removeprefix('eval-')} ({label}) | {cells} |")
    differences = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name, {}), after.get(name, {})
        changed = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
        only = {"only before": sorted(a.keys() - b.keys()), "only after": sorted(b.keys() - a.keys())}
        differences += bool(changed) + bool(only["only before"])  # a metric that disappeared counts; a new one not
        print(f"{name}: {len(a.keys() & b.keys())} shared metrics "
              + ("identical" if not changed else f"differ in {changed[:5]}")
              + "".join(f"; {label}: {keys[:3]}{' ...' if len(keys) > 3 else ''}" for label, keys in only.items() if keys))
    for stage in sorted(p for p in args.before.iterdir() if p.is_dir() and not p.name.startswith(".")):
        a, b = final_weights(stage), final_weights(args.after / stage.name)
        if a is None:
            continue
        same = b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        differences += not same
        print(f"{stage.name}: final weights {'identical' if same else 'DIFFER'} ({len(a)} tensors)")
    print("same numbers" if not differences else f"{differences} differences")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
