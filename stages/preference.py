"""Preference stage: build (caption, chosen, rejected, scores) pairs for the reward and DPO stages.

Default: for each of `preference.prompts` training prompts from the task (stages/tasks.py: never a held-out
composition, or captions of the curated training split), sample K images from the current model with different
noise, score each with the judge (the programmatic verifier, a learned reward model, or on task captions the
features stage's contrastive scorer), and keep the best against the worst where their scores differ. Alternatively load human-labelled pairs in
Pick-a-Pic's layout (caption, jpg_0, jpg_1, label_0) through Hugging Face `datasets`. On the synthetic task,
`preference.near_miss_pairs` adds rendered scenes against near misses of them (kinds "near_miss_<kind>"): pairs that
differ in the one property the caption checks.

Pairs are shards (one bucket: the evaluated resolution), one record per prompt: the chosen and rejected VAE latents
(what DPO trains on), the caption's text embedding, and every judged image of the prompt as uint8 pixels with its
score (what the reward stage trains on: all differently scored pairs, not only best against worst); meta repeats
the chosen and rejected scores.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from data.shards import ShardWriter, read_manifest
from kiln import seeding
from kiln.generate import generate_latents, to_pil, to_uint8
from kiln.geometry import vae_factor
from kiln.images import image_tensor
from kiln.stage_io import StageResult
from kiln.text_encoder import text_encoder_for
from kiln.vae import decode_latents, encode_images, vae_for
from reward.scoring import make_scorer
from stages.common import pick_device, save_uncond
from stages.sampling import load_stage
from stages.tasks import task_for


def make_judge(cfg, inputs: dict, device):
    """judge(images: list of PIL, captions) -> scores in the judge's units: the verifier's fraction of checks
    passed, the learned reward model's output, or the contrastive scorer's alignment (loaded once)."""
    pcfg, judge = cfg.preference, cfg.preference_judge()
    if judge == "reward_model" and not pcfg.reward_model:
        raise ValueError("preference: judge 'reward_model' needs preference.reward_model (a reward stage output)")
    score = make_scorer(cfg, {judge: 1.0}, pcfg.reward_model, device, features=inputs.get("features"))
    return lambda images, captions: score(images, captions)[0].tolist()


@torch.no_grad()
def sample_pairs(cfg, inputs: dict, model, vae, resolution: int, device):
    """Yield one record per prompt whose best and worst samples' scores differ by at least
    preference.min_score_gap (and by something): (kind, caption, chosen latents (C, h, w), rejected latents, all K
    images uint8 (K, 3, H, W), all K scores (K,))."""
    pcfg = cfg.preference
    encoder = text_encoder_for(cfg, device)
    judge = make_judge(cfg, inputs, device)
    null_text, null_mask = encoder([cfg.sampler.negative_prompt])
    generator = torch.Generator(device=device).manual_seed(pcfg.seed)
    prompts = task_for(cfg, inputs, device).training_prompts(pcfg.prompts, pcfg.seed, pcfg.kinds)
    k = pcfg.samples_per_prompt
    per_batch = max(1, pcfg.batch_size // k)  # prompts per sampling batch; each prompt's K samples stay together
    for start in tqdm(range(0, len(prompts), per_batch), desc="preference", unit="batch"):
        chunk = prompts[start : start + per_batch]
        captions = [text for _, text in chunk for _ in range(k)]
        text, mask = encoder(captions)  # (P*K, L, D), (P*K, L)
        latents = generate_latents(model, text, mask, null_text, null_mask, height=resolution, width=resolution,
                                   vae_factor=vae_factor(cfg.vae), steps=pcfg.steps, cfg=pcfg.cfg,
                                   sched=cfg.scheduler, generator=generator)
        pixels = to_uint8(decode_latents(vae, latents))  # (P*K, 3, H, W)
        images = to_pil(pixels)
        scores = torch.tensor(judge(images, captions)).view(len(chunk), k)  # (P, K)
        latents = latents.view(len(chunk), k, *latents.shape[1:])  # (P, K, C, h, w)
        pixels = pixels.view(len(chunk), k, *pixels.shape[1:]).cpu()  # (P, K, 3, H, W)
        for i, (kind, text) in enumerate(chunk):
            best, worst = int(scores[i].argmax()), int(scores[i].argmin())
            gap = float(scores[i, best] - scores[i, worst])
            if gap > 0 and gap >= pcfg.min_score_gap:
                yield kind, text, latents[i, best], latents[i, worst], pixels[i], scores[i]


@torch.no_grad()
def near_miss_pairs(cfg, inputs: dict, vae, resolution: int, device):
    """Yield records of rendered training scenes (chosen) against their near misses (rejected), as sample_pairs
    does (K = 2, chosen first); a pair the judge does not rank scene over near miss is dropped."""
    pcfg = cfg.preference
    judge = make_judge(cfg, inputs, device)
    # Synthetic task only: the config refuses near_miss_pairs on task captions before any compute.
    rendered = task_for(cfg, inputs, device).near_miss_pairs(pcfg.near_miss_pairs, seeding.near_miss(pcfg.seed), pcfg.kinds, resolution)
    for start in tqdm(range(0, len(rendered), pcfg.batch_size), desc="preference (near misses)", unit="batch"):
        chunk = rendered[start : start + pcfg.batch_size]
        images = [image for _, _, scene, miss in chunk for image in (scene, miss)]
        captions = [text for _, text, _, _ in chunk for _ in range(2)]
        scores = torch.tensor(judge(images, captions)).view(len(chunk), 2)  # (P, 2): scene, near miss
        pixels = torch.stack([image_tensor(image) for image in images])  # (2P, 3, H, W) in [-1, 1]
        latents = encode_images(vae, pixels.to(device))
        latents = latents.view(len(chunk), 2, *latents.shape[1:])  # (P, 2, C, h, w)
        pixels = to_uint8(pixels).view(len(chunk), 2, *pixels.shape[1:])  # (P, 2, 3, H, W)
        for i, (kind, text, _, _) in enumerate(chunk):
            if scores[i, 0] > scores[i, 1]:
                yield f"near_miss_{kind}", text, latents[i, 0], latents[i, 1], pixels[i], scores[i]


def _as_image(value) -> Image.Image:
    """A Pick-a-Pic cell (raw bytes, {"bytes": ...} or a PIL image) -> RGB PIL image."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    if not isinstance(value, Image.Image):
        raise ValueError(f"preference: expected image bytes or an image, got {type(value).__name__}")
    return value.convert("RGB")


def _square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, then resize to size x size."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def load_pair_dataset(pcfg):
    """Pick-a-Pic-layout pairs as a datasets.Dataset: a parquet file, a folder datasets can load, or a hub id."""
    from datasets import load_dataset

    source = pcfg.dataset
    path = Path(source)
    if path.is_file():
        ds = load_dataset(path.suffix.lstrip(".") or "parquet", data_files=str(path), split="train")
    else:  # a local folder, or a hub id the user named (the only case that reaches the network)
        ds = load_dataset(source, split=pcfg.dataset_split)
    needed = [pcfg.caption_column, *pcfg.image_columns, pcfg.label_column]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ValueError(f"preference: dataset {source} has no column(s) {', '.join(missing)} "
                         f"(it has: {', '.join(ds.column_names)})")
    return ds


@torch.no_grad()
def labelled_pairs(cfg, vae, resolution: int, device):
    """Yield records from a Pick-a-Pic-layout dataset, as sample_pairs does (K = 2, chosen first); ties (label 0.5)
    are dropped. Scores are the labels."""
    pcfg = cfg.preference
    ds = load_pair_dataset(pcfg)
    first, second = pcfg.image_columns
    for row in tqdm(ds, desc="preference (labelled)", unit="pair"):
        label = float(row[pcfg.label_column])
        if label == 0.5:
            continue
        chosen, rejected = (row[first], row[second]) if label > 0.5 else (row[second], row[first])
        images = torch.stack([image_tensor(_square(_as_image(x), resolution)) for x in (chosen, rejected)])
        latents = encode_images(vae, images.to(device))  # (2, C, h, w)
        scores = torch.tensor([max(label, 1 - label), min(label, 1 - label)])
        yield "labelled", str(row[pcfg.caption_column]), latents[0], latents[1], to_uint8(images), scores


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    _, model, vae_dir, meta = load_stage(Path(inputs["model"]), device)
    vae = vae_for(cfg, vae_dir, device)
    resolution = cfg.eval.resolution or meta.get("resolution") or cfg.train.rungs[-1].resolution
    pairs = labelled_pairs(cfg, vae, resolution, device) if cfg.preference.dataset else \
        sample_pairs(cfg, inputs, model, vae, resolution, device)
    if cfg.preference.near_miss_pairs:
        pairs = itertools.chain(pairs, near_miss_pairs(cfg, inputs, vae, resolution, device))
    encoder = text_encoder_for(cfg, device)
    n, gaps, chosen_scores, kinds = 0, 0.0, 0.0, {}
    with ShardWriter(out_dir / "shards", max_samples_per_shard=cfg.data.max_samples_per_shard) as writer:
        for kind, text, chosen, rejected, images, scores in pairs:
            emb, mask = encoder([text])
            length = int(mask[0].sum())
            score_chosen, score_rejected = float(scores.max()), float(scores.min())
            writer.write(bucket=(resolution, resolution), key=f"pair-{n:06d}", caption=text,
                         tensors={"chosen": chosen.cpu(), "rejected": rejected.cpu(), "images": images,
                                  "scores": scores,
                                  "text_emb": emb[0, :length].cpu(), "text_mask": mask[0, :length].cpu()},
                         meta={"kind": kind, "score_chosen": score_chosen, "score_rejected": score_rejected})
            n += 1
            gaps += score_chosen - score_rejected
            chosen_scores += score_chosen
            kinds[kind] = kinds.get(kind, 0) + 1
    if n == 0:
        raise ValueError("preference: no pairs (every prompt's samples scored the same, or the dataset was empty)")
    null_emb, null_mask = encoder([cfg.sampler.negative_prompt])
    save_uncond(out_dir / "uncond.safetensors", null_emb[0], null_mask[0])
    metrics = {"preference/pairs": n, "preference/score_gap": gaps / n, "preference/chosen_score": chosen_scores / n,
               **{f"preference/pairs_{k}": v for k, v in kinds.items()}}
    if not cfg.preference.dataset:
        sampled = sum(v for k, v in kinds.items() if not k.startswith("near_miss_"))
        metrics["preference/kept_fraction"] = sampled / cfg.preference.prompts
    tracker.log_metrics(metrics)
    return StageResult("preference", out_dir, metrics, read_manifest(out_dir / "shards")["content_hash"])
