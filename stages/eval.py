"""Eval stage. Task captions: stages/eval_captions.py (held-out loss, FD, alignment). Task synthetic: generate for
held-out and training compositions, check every image with the programmatic
verifier, log per-category accuracy (colour, shape, count, relation), a verifier table and a labelled grid.

Also measured: sampling throughput (images/s), a random-caption baseline (each image checked against the caption of
another prompt of its split and kind, drawn at random: what a model that ignores the text but draws the evaluated
distribution would score), given the previous evaluated stage (`inputs["previous"]`, same prompts and noise) the
paired gain over it with a 95% bootstrap interval over prompts (kiln/stats.py), and, given a features stage (`inputs["features"]`), the Frechet distance between the
generated images and real renders of the same prompts on that stage's feature network. Either task: a grid of the
user's own validation prompts (eval.prompts) from fixed noise."""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.synthetic import caption, eval_prompts, make_holdout, render
from kiln import seeding
from kiln.generate import image_grid
from kiln.stage_io import StageResult, hash_files
from kiln.stats import paired_bootstrap_ci
from kiln.vae import vae_for
from reward.verifier import verify
from stages.common import pick_device, write_json
from stages.sampling import generate_for_captions, load_stage

CHECKS = ("colour", "shape", "count", "relation")
# What a stage's gain over the previous evaluated stage is measured on: held-out compositions, per kind's own check.
# Paired gains over the previous evaluation: held-out compositions (generalisation), and training compositions on
# prompts and noise no stage trained on (what post-training optimises: its prompts are training compositions).
GAIN_METRICS = tuple((split, kind, check) for split in ("heldout", "train")
                     for kind, check in (("single", "colour_shape"), ("count", "count"), ("relation", "relation"),
                                         ("all", "score")))
REAL_PER_PROMPT = 4  # real renders per evaluated prompt for the Frechet distance's reference set


def summarise(rows: list[dict]) -> dict[str, float]:
    """Rows of verdicts -> accuracies keyed eval/<split>/<kind>/<check> plus per-split means."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for check in (*CHECKS, "correct", "colour_shape", "baseline_correct", "baseline_colour_shape"):
            value = row.get(check)
            if value is None:
                continue
            groups[f"eval/{row['split']}/{row['kind']}/{check}"].append(float(value))
            groups[f"eval/{row['split']}/all/{check}"].append(float(value))
        groups[f"eval/{row['split']}/all/score"].append(row["score"])
        groups[f"eval/{row['split']}/all/baseline_score"].append(row["baseline_score"])
    return {key: sum(values) / len(values) for key, values in sorted(groups.items())}


def prompt_scores(rows: list[dict], images_per_prompt: int, split: str, kind: str, check: str) -> dict[int, float]:
    """{prompt index: the mean of `check` over that prompt's images}, for one split and kind ("all": every kind)."""
    by_prompt: dict[int, list[float]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row["split"] == split and kind in ("all", row["kind"]) and row.get(check) is not None:
            by_prompt[i // images_per_prompt].append(float(row[check]))
    return {prompt: sum(values) / len(values) for prompt, values in by_prompt.items()}


def paired_gains(previous_rows: list[dict], rows: list[dict], images_per_prompt: int) -> dict[str, float]:
    """This evaluation's gain over the previous stage's on the same prompts and noise, per GAIN_METRICS: the mean
    per-prompt difference and its 95% paired bootstrap interval (eval/gain/..., _low, _high)."""
    if [r["caption"] for r in previous_rows] != [r["caption"] for r in rows]:
        raise ValueError("eval: the previous stage's evaluation used other prompts: the gain needs the same ones")
    out = {}
    for split, kind, check in GAIN_METRICS:
        before = prompt_scores(previous_rows, images_per_prompt, split, kind, check)
        after = prompt_scores(rows, images_per_prompt, split, kind, check)
        prompts = sorted(before.keys() & after.keys())
        if not prompts:
            continue
        gain, low, high = paired_bootstrap_ci([before[p] for p in prompts], [after[p] for p in prompts])
        key = f"eval/gain/{split}/{kind}/{check}"
        out |= {key: gain, f"{key}_low": low, f"{key}_high": high}
    return out


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    _, model, vae_dir, meta = load_stage(Path(inputs["model"]), device)
    vae = vae_for(cfg, vae_dir, device)
    ecfg = cfg.eval
    resolution = ecfg.resolution or meta.get("resolution") or max(r.resolution for r in cfg.train.rungs)
    if ecfg.prompts:
        validation_grid(cfg, model, vae, resolution, out_dir / "samples", tracker)
    if cfg.task_kind == "captions":
        from stages import eval_captions

        metrics = eval_captions.run(cfg, model, vae, inputs, out_dir, resolution, tracker, device)
        tracker.log_metrics(metrics)
        return StageResult("eval", out_dir, metrics, hash_files(out_dir / "samples"))
    holdout = make_holdout(cfg.data.holdout_seed)
    rng = random.Random(ecfg.seed)
    prompts = []  # (split, spec, caption)
    for split in ecfg.splits:
        for spec in eval_prompts(holdout, split, ecfg.prompts_per_kind, ecfg.seed):
            prompts += [(split, spec, caption(spec, rng))] * ecfg.images_per_prompt
    captions = [p[2] for p in prompts]
    images, started = [], time.perf_counter()
    for start in tqdm(range(0, len(captions), ecfg.batch_size), desc="eval", unit="batch"):
        images += generate_for_captions(
            cfg, model, vae, captions[start : start + ecfg.batch_size], width=resolution,
            height=resolution, steps=ecfg.steps, cfg_scale=ecfg.cfg, seed=seeding.eval_batch(ecfg.seed, start),
            batch_size=ecfg.batch_size)
    images_per_s = len(images) / (time.perf_counter() - started)

    baseline_rng = random.Random(seeding.eval_baseline(ecfg.seed))
    by_group = defaultdict(list)  # (split, kind) -> captions
    for split, spec, text in prompts:
        by_group[split, spec.kind].append(text)
    rows = []
    samples = out_dir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for i, ((split, spec, text), image) in enumerate(zip(prompts, images)):
        verdict = verify(image, text)
        baseline = verify(image, baseline_rng.choice(by_group[split, spec.kind]))
        name = f"{i:04d}-{split}-{spec.kind}.png"
        image.save(samples / name)
        rows.append({
            "image": name, "split": split, "kind": spec.kind, "caption": text,
            "colour": verdict.colour, "shape": verdict.shape, "count": verdict.count,
            "relation": verdict.relation, "correct": verdict.correct,
            "colour_shape": verdict.colour and verdict.shape,
            "score": sum(verdict.checks()) / len(verdict.checks()),  # the verifier's reward in [0, 1]
            "baseline_correct": baseline.correct, "baseline_colour_shape": baseline.colour and baseline.shape,
            "baseline_score": sum(baseline.checks()) / len(baseline.checks()),
        })
    metrics = {**summarise(rows), "eval/resolution": resolution, "eval/images_per_s": images_per_s,
               "eval/steps": ecfg.steps}
    if inputs.get("features"):
        metrics |= frechet_distances(cfg, Path(inputs["features"]), prompts, images, resolution, device)
    if inputs.get("previous"):
        previous = json.loads((Path(inputs["previous"]) / "samples" / "verifier.json").read_text())["rows"]
        metrics |= paired_gains(previous, rows, ecfg.images_per_prompt)
        tracker.set_tags({"kiln.gain_over": Path(inputs["previous"]).name})
    # The stage's output (hashed for the cache) holds what the model drew, not how fast this machine drew it: a
    # rerun with identical images must not look like a changed input to the evaluation that pairs against it.
    write_json(samples / "verifier.json", {"metrics": {k: v for k, v in metrics.items() if k != "eval/images_per_s"},
                                           "rows": rows})
    labels = [f"{'ok' if r['correct'] else 'x'} {r['caption']}" for r in rows]
    step = ecfg.images_per_prompt
    grid = image_grid(images[::step], labels[::step], cols=8)
    grid.save(samples / "grid.png")
    tracker.log_metrics(metrics)
    tracker.log_table(rows, "verifier_table.json")
    tracker.log_image(grid, key="eval_grid", step=0)
    return StageResult("eval", out_dir, metrics, hash_files(samples))



def validation_grid(cfg, model, vae, resolution: int, samples: Path, tracker) -> None:
    """eval.prompts, one image each from fixed noise (the same at every stage), as samples/prompts.png and an
    MLflow image: what users of every trainer look at after each stage."""
    ecfg = cfg.eval
    images = generate_for_captions(cfg, model, vae, ecfg.prompts, width=resolution, height=resolution,
                                   steps=ecfg.steps, cfg_scale=ecfg.cfg, seed=ecfg.seed, batch_size=ecfg.batch_size)
    samples.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, [prompt[:32] for prompt in ecfg.prompts], cols=min(8, len(images)))
    grid.save(samples / "prompts.png")
    tracker.log_image(grid, key="validation_prompts", step=0)


def frechet_distances(cfg, features_dir: Path, prompts, images, resolution: int, device) -> dict[str, float]:
    """Per split, the Frechet distance between the generated images' features and those of REAL_PER_PROMPT real
    renders of each of the same prompts (seeded, so every evaluation compares against the same real set)."""
    from kiln.features import features_of, frechet_distance
    from kiln.images import image_tensor
    from kiln.features import load_feature_net

    net = load_feature_net(features_dir, device)
    rng = random.Random(cfg.eval.seed)
    out = {}
    for split in cfg.eval.splits:
        generated = [image_tensor(im) for (s, _, _), im in zip(prompts, images) if s == split]
        real = [image_tensor(render(spec, resolution, resolution, rng)[0])
                for s, spec, _ in prompts if s == split for _ in range(REAL_PER_PROMPT)]
        fd = frechet_distance(features_of(net, torch.stack(generated).to(device)),
                              features_of(net, torch.stack(real).to(device)))
        out[f"eval/{split}/frechet_distance"] = fd
    return out
