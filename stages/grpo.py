"""GRPO stage: Flow-GRPO on training prompts, from the previous stage's weights, that stage frozen as reference.

One step: sample G = num_generations images for each of `prompts_per_step` training prompts with the SDE sampler
(kiln/sampler.py `sample_sde`, fewer steps than evaluation, true CFG), keeping every step's Gaussian log-prob;
score them with the reward (the verifier, the learned reward model, or a weighted sum); normalise rewards within
each prompt's group; then re-evaluate the log-probs of a random subset of the denoising steps under the current
policy and minimise the PPO-clipped surrogate plus beta * KL to the reference (kiln/grpo.py), one optimizer step
per sampled batch and pass. Only training compositions are ever sampled: held-out ones stay for evaluation.

Under torchrun each of N processes samples and scores the groups of prompts_per_step / N prompts (a group never
spans processes, so advantages stay per group) with its own noise stream, seeded per step and rank so a resumed
run draws the same; gradients are averaged (or reduce-scattered under FSDP2) before each optimizer step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from kiln import distributed, seeding
from kiln.checkpoint import resolve_checkpoint
from kiln.diffusion import Denoiser, make_process
from kiln.generate import initial_noise
from kiln.geometry import token_grid, vae_factor
from kiln.grpo import group_advantages, grpo_loss
from kiln.models import unpack
from kiln.sampler import flow_sigmas, guided_prediction, sample_sde, sde_mean_std, sde_step_log_prob
from kiln.stage_io import StageResult, hash_files
from kiln.text_encoder import text_encoder_for
from kiln.vae import decode_latents, vae_for
from reward.scoring import make_scorer
from stages.common import training_device
from stages.policy import policy_trainer
from stages.preference import training_captions


def reward_weights(cfg) -> dict[str, float]:
    """The reward's components and their weights."""
    kind = cfg.grpo.reward
    if kind == "weighted":
        return {name: w for name, w in cfg.grpo.reward_weights.items() if w != 0}
    return {kind: 1.0}


def make_reward(cfg, reward_dir: Path | None, device):
    """reward(images (B, 3, H, W) in [-1, 1], captions) -> (total (B,), {component: (B,)})."""
    weights = reward_weights(cfg)
    path = cfg.grpo.reward_model or reward_dir
    if "reward_model" in weights and path is None:
        raise ValueError("grpo: the reward uses the reward model but there is no reward stage output "
                         "(run the reward stage or set grpo.reward_model)")
    return make_scorer(cfg, weights, path, device)


def run(cfg, inputs: dict, out_dir: Path, tracker) -> StageResult:
    out_dir = Path(out_dir)
    gcfg = cfg.grpo
    init = Path(inputs["init"])
    resolution = json.loads((resolve_checkpoint(init) / "meta.json").read_text()).get(
        "resolution", cfg.train.rungs[-1].resolution)
    generator = torch.Generator(device=training_device(cfg)).manual_seed(gcfg.seed)
    # Every step is logged: each one samples and scores a fresh batch, so its reward is the curve to watch.
    trainer, reference = policy_trainer(
        cfg, "grpo", init, out_dir, tracker, steps=gcfg.max_steps, learning_rate=gcfg.learning_rate, warmup_steps=0,
        max_grad_norm=gcfg.max_grad_norm, state={"generator": generator}, log_every=1, postfix=("reward", "kl"))
    trainer.meta["resolution"] = resolution
    device, ranks = trainer.device, trainer.ranks
    if gcfg.prompts_per_step % ranks.world_size:
        raise ValueError(f"grpo: prompts_per_step {gcfg.prompts_per_step} does not split over {ranks.world_size} "
                         f"processes")
    trainer.start()
    vae = vae_for(cfg, Path(inputs["vae"]), device)
    encoder = text_encoder_for(cfg, device)
    reward = make_reward(cfg, inputs.get("reward"), device)
    null_text, null_mask = encoder([cfg.sampler.negative_prompt])  # (1, L0, D)

    h = w = resolution // vae_factor(cfg.vae)
    grid = token_grid(h, w)
    sigmas = flow_sigmas(gcfg.num_inference_steps, grid[0] * grid[1], cfg.scheduler).to(device)  # (steps + 1,)
    sigma_max = sigmas[1]
    steps = len(sigmas) - 1
    n_train = max(1, round(gcfg.timestep_fraction * steps))
    group = gcfg.num_generations
    policy = trainer.forward

    def sampled_batches():
        """Per step: sample G images for each prompt with the current policy, keeping the trajectory and its per-step
        log-probs, score them and normalise within groups; the same batch serves num_iterations optimizer steps."""
        while True:
            step_rng = random.Random(seeding.grpo_prompts(gcfg.seed, trainer.step))  # this step's prompts, resumable
            prompts = [c for _, c in training_captions(cfg, gcfg.prompts_per_step, step_rng.randrange(2**31),
                                                          gcfg.prompt_kinds)]
            if ranks.distributed:  # this process's prompts, and its own noise stream for this step
                share = gcfg.prompts_per_step // ranks.world_size
                prompts = prompts[ranks.rank * share:(ranks.rank + 1) * share]
                generator.manual_seed(seeding.grpo_noise(gcfg.seed, trainer.step, ranks.rank))
            captions = [c for c in prompts for _ in range(group)]  # TRL's layout: each prompt G times in a row
            text, mask = encoder(captions)  # (B, L, D), (B, L)
            null_b, null_mask_b = null_text.expand(len(captions), -1, -1), null_mask.expand(len(captions), -1)
            policy.eval()
            with torch.no_grad():
                velocity = guided_prediction(policy, text, mask, null_b, null_mask_b, gcfg.cfg, grid)
                noise = initial_noise(len(captions), cfg.vae.z_dim, h, w, generator, device)  # (B, N, C*4)
                denoiser = Denoiser(velocity, "flow", make_process(None))
                x0, old_log_probs, trajectory = sample_sde(denoiser, noise, sigmas, noise_level=gcfg.noise_level,
                                                           generator=generator)  # (B, N, D), (B, T), (B, T+1, N, D)
                images = decode_latents(vae, unpack(x0, h, w))  # (B, 3, H, W)
                rewards, parts = reward(images, captions)  # (B,)
            policy.train()
            all_rewards = distributed.gather_rows(rewards.to(device))  # (P * G,) over all processes
            batch = {"text": text, "mask": mask, "null": (null_b, null_mask_b), "trajectory": trajectory,
                     "old_log_probs": old_log_probs,
                     "advantages": group_advantages(rewards, group, gcfg.scale_rewards).to(device),  # (B,)
                     # The same subset of denoising steps for the whole batch.
                     "train_steps": sorted(step_rng.sample(range(steps), n_train)),
                     "metrics": {"reward": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
                                 **{f"reward_{name}": distributed.gather_rows(value.to(device)).mean().item()
                                    for name, value in parts.items()}}}
            for _ in range(gcfg.num_iterations):
                yield batch

    def guided(model, batch):
        return guided_prediction(model, batch["text"], batch["mask"], *batch["null"], gcfg.cfg, grid)

    def forward_backward(batch: dict) -> dict:
        """The clipped surrogate plus beta * KL on each trained denoising step, gradients accumulated over them."""
        sums: dict[str, float] = {}
        for j in batch["train_steps"]:
            x_j, x_next = batch["trajectory"][:, j], batch["trajectory"][:, j + 1]
            v = guided(policy, batch)(x_j, sigmas[j])
            log_prob, mean, std = sde_step_log_prob(v, x_j, x_next, sigmas[j], sigmas[j + 1],
                                                    noise_level=gcfg.noise_level, sigma_max=sigma_max)
            ref_mean = None
            if gcfg.beta > 0:
                with torch.no_grad():
                    v_ref = guided(reference, batch)(x_j, sigmas[j])
                    ref_mean = sde_mean_std(v_ref, x_j, sigmas[j], sigmas[j + 1], noise_level=gcfg.noise_level,
                                            sigma_max=sigma_max)[0]
            loss, stats = grpo_loss(log_prob, batch["old_log_probs"][:, j], batch["advantages"], epsilon=gcfg.epsilon,
                                    epsilon_high=gcfg.epsilon_high, beta=gcfg.beta, mean=mean, ref_mean=ref_mean,
                                    std=std)
            (loss / n_train).backward()
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value) / n_train
        sums = {k: distributed.mean_across(torch.tensor(v, device=device)).item() for k, v in sums.items()}
        return {**sums, **batch["metrics"]}

    trainer.fit(forward_backward, sampled_batches)
    return StageResult("grpo", out_dir, {"steps": trainer.step}, hash_files(out_dir / "checkpoints"))
