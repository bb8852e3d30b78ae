"""Measured ratios for the foundation's speed goals, all in one run on the same machine:

1. pretrain stage throughput (Trainer + shard loader) / a bare PyTorch loop on the same model and batches (>= 0.95)
2. sampler speed / diffusers' QwenImagePipeline on the same weights, embeddings, steps and CFG (>= 1.0)
3. shard loader throughput / what training consumes (>= 5)

python benchmarks/bench.py [--preset tiny] [--steps 60] [--resolution 128]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from data.shards import BucketBatches
from kiln.config import load_config
from kiln.diffusion import diffusion_loss
from kiln.generate import generate_latents
from kiln.geometry import vae_factor
from kiln.sampler import make_scheduler
from kiln.tracking import Tracker
from stages import pretrain
from stages.common import data_vae_latents


def build_dataset(cfg, root: Path) -> Path:
    """data -> untrained vae -> latents: enough real shards for timing (the numbers don't need a trained VAE)."""
    return data_vae_latents(cfg, root) / "latents"


def trainer_chunk(stage, batches):
    """Returns a callable running n stage steps (kiln.trainer's train_step with the rung's loss step and loader,
    including its per-step loss read) -> images."""

    def run(n):
        images = 0
        for _ in range(n):
            images += stage.trainer.train_step(stage.forward_backward, next(batches))["images"]
        return images

    return run


def bare_chunk(cfg, model, batches):
    """The same model, optimizer and objective, batches already in memory, nothing else."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    state = {"i": 0}

    def run(n):
        images = 0
        for _ in range(n):
            batch = batches[state["i"] % len(batches)]
            state["i"] += 1
            loss, _, _ = diffusion_loss(model, batch["latents"], batch["text_emb"], batch["text_mask"],
                                            cfg.objective, cfg.scheduler, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            images += batch["latents"].shape[0]
        return images

    return run


def interleaved_throughput(runners: dict, steps: int, rounds: int = 4, warmup: int = 5) -> dict:
    """images/s of each runner, timed in alternating chunks so drifts in machine speed hit all of them alike."""
    for run in runners.values():
        run(warmup)
    images = dict.fromkeys(runners, 0)
    seconds = dict.fromkeys(runners, 0.0)
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            images[name] += run(max(1, steps // rounds))
            seconds[name] += time.perf_counter() - start
    return {name: images[name] / seconds[name] for name in runners}


def time_sampler(cfg, model, text, mask, null, null_mask, resolution, steps, repeats=3):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=make_scheduler(cfg.scheduler), vae=None, text_encoder=None, tokenizer=None,
                             transformer=model)
    pipe.set_progress_bar_config(disable=True)
    b = text.shape[0]

    def ours():
        generate_latents(model, text, mask, null, null_mask, height=resolution, width=resolution,
                         vae_factor=vae_factor(cfg.vae), steps=steps, cfg=4.0, sched=cfg.scheduler,
                         generator=torch.Generator().manual_seed(0))

    def theirs():
        pipe(prompt_embeds=text, prompt_embeds_mask=mask.long(), negative_prompt_embeds=null.expand(b, -1, -1),
             negative_prompt_embeds_mask=null_mask.long().expand(b, -1), true_cfg_scale=4.0, num_inference_steps=steps,
             height=resolution, width=resolution, generator=torch.Generator().manual_seed(0), output_type="latent")

    ours(), theirs()  # warm-up
    best = {}
    for name, fn in (("ours", ours), ("pipeline", theirs)) * repeats:
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def time_loader(latents_dir, batch_size, buckets, batches_wanted):
    loader = BucketBatches(latents_dir / "shards", batch_size, seed=0, buckets=buckets)
    n, start = 0, time.perf_counter()
    for batch in loader.batches_forever():
        n += batch["latents"].shape[0]
        if n >= batches_wanted * batch_size:
            break
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per loop")
    parser.add_argument("--rung", type=int, default=-1, help="which rung's resolution and batch size (default last)")
    parser.add_argument("--samples", type=int, default=1024, help="samples per resolution in the timing dataset")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cfg = load_config(args.preset, [f"data.samples_per_resolution={args.samples}", "vae.train.steps=0",
                                    "device=cpu"])
    rung_index = args.rung % len(cfg.train.rungs)
    rung = cfg.train.rungs[rung_index]
    with tempfile.TemporaryDirectory() as tmp:
        latents_dir = build_dataset(cfg, Path(tmp))

        stage = pretrain.Rung(cfg, rung, rung_index, latents_dir,
                              Path(tmp) / "stage", Tracker(None), "bench", f"pretrain-{rung.resolution}", None)
        # The bare loop gets a copy of the same initial model and the stage's own first batches, preloaded.
        model = copy.deepcopy(stage.trainer.model)
        loader = BucketBatches(latents_dir / "shards", rung.batch_size, seed=cfg.seed, buckets=stage.buckets)
        batches = [b for _, b in zip(range(16), loader.batches_forever())]
        ips = interleaved_throughput({"stage": trainer_chunk(stage, stage.batches()),
                                      "bare": bare_chunk(cfg, model, batches)}, args.steps)
        trainer_ips, bare_ips = ips["stage"], ips["bare"]

        loader_ips = time_loader(latents_dir, rung.batch_size, stage.buckets, batches_wanted=100)

        from kiln.text_encoder import build_text_encoder

        encoder = build_text_encoder(cfg.text_encoder)
        text, mask = encoder(["a red circle", "three blue squares", "a green triangle left of a yellow circle",
                              "two red triangles"])
        null, null_mask = encoder([cfg.sampler.negative_prompt])
        sampler = time_sampler(cfg, stage.trainer.ema, text, mask, null, null_mask, rung.resolution, cfg.sampler.steps)

    print(f"\nKiln benchmark: preset {cfg.name}, rung {rung.resolution}px, batch {rung.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"training   stage {trainer_ips:8.1f} img/s   bare loop {bare_ips:8.1f} img/s   "
          f"ratio {trainer_ips / bare_ips:5.2f}  (goal >= 0.95)")
    print(f"sampler    kiln {sampler['ours']:7.3f} s      QwenImagePipeline {sampler['pipeline']:7.3f} s   "
          f"ratio {sampler['pipeline'] / sampler['ours']:5.2f}  (goal >= 1.0; {text.shape[0]} prompts, "
          f"{cfg.sampler.steps} steps, CFG 4)")
    print(f"loader     {loader_ips:8.1f} samples/s   training consumes {trainer_ips:8.1f}   "
          f"ratio {loader_ips / trainer_ips:6.1f}  (goal >= 5)")


if __name__ == "__main__":
    main()
