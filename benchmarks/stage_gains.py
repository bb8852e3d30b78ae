"""Each evaluated stage's paired gain over the one before it, from a finished run's eval outputs (the eval stage logs
the same numbers for runs made since it takes the previous evaluation; this reads older runs too).

    python benchmarks/stage_gains.py runs/NAME
    python benchmarks/stage_gains.py --pair BEFORE_EVAL AFTER_EVAL   # two eval folders of one eval config, e.g. a
                                                                     # run's rung and an ablation's (A/B of a setting)

Per stage and held-out metric: the mean per-prompt gain and its 95% paired bootstrap interval (same prompts and noise
for both stages; stages/eval.py paired_gains)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kiln.config import config_from_dict
from stages.eval import GAIN_METRICS, paired_gains
from stages.registry import pipeline_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?")
    parser.add_argument("--pair", type=Path, nargs=2, metavar=("BEFORE_EVAL", "AFTER_EVAL"))
    parser.add_argument("--images-per-prompt", type=int, default=2, help="for --pair: the eval's images_per_prompt")
    args = parser.parse_args()
    if args.pair:
        before, after = (json.loads((d / "samples" / "verifier.json").read_text())["rows"] for d in args.pair)
        if [r["caption"] for r in before] != [r["caption"] for r in after]:
            raise SystemExit("stage_gains: the two evaluations did not draw the same prompts (different eval config)")
        gains = paired_gains(before, after, args.images_per_prompt)
        for key in (f"eval/gain/{split}/{kind}/{check}" for split, kind, check in GAIN_METRICS):
            print(f"{key.removeprefix('eval/gain/')}: {gains[key]:+.3f} [{gains[key + '_low']:+.3f}, "
                  f"{gains[key + '_high']:+.3f}]")
        return
    first = next(args.run.glob("eval-*/manifest.json"))
    cfg = config_from_dict(json.loads(first.read_text())["config"])
    evals = [stage.name for stage in pipeline_plan(cfg) if stage.kind == "eval"]
    rows = {name: json.loads((args.run / name / "samples" / "verifier.json").read_text())["rows"] for name in evals
            if (args.run / name / "samples" / "verifier.json").exists()}
    keys = [f"eval/gain/{split}/{kind}/{check}" for split, kind, check in GAIN_METRICS]
    print("| stage (over the one before) | " + " | ".join(k.removeprefix("eval/gain/") for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    names = list(rows)
    for previous, name in zip(names, names[1:]):
        gains = paired_gains(rows[previous], rows[name], cfg.eval.images_per_prompt)
        cells = [f"{gains[k]:+.3f} [{gains[k + '_low']:+.3f}, {gains[k + '_high']:+.3f}]" if k in gains else "-"
                 for k in keys]
        print(f"| {name.removeprefix('eval-')} (over {previous.removeprefix('eval-')}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
