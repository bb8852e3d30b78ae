"""GRPO stage: Flow-GRPO on training prompts, from the previous stage's weights, that stage frozen as reference.

One step: for each of `prompts_per_step` training prompts, G = num_generations images from one initial noise
(`shared_initial_noise`), Euler (ODE) steps except a window of `sde_window` SDE steps that starts at a step drawn
from the first `sde_window_starts` (Flow-GRPO-Fast, MixGRPO); kiln/sampler.py `sample_sde` keeps the window's
Gaussian log-probs. Score the images with the reward (the verifier with partial credit, the verifier, the learned
reward model, or a weighted sum); normalise rewards within each prompt's group and drop the groups whose rewards are
all equal (no signal); then re-evaluate the window's log-probs under the current policy and minimise the PPO-clipped
surrogate plus beta * KL to the reference (kiln/grpo.py `window_step_losses`), one optimizer step per sampled batch
and pass. The first pass over a fresh rollout is on-policy: its importance ratio is exactly 1 (logged as
`ratio_dev`). Only training compositions are ever sampled; `heldout_prompts` held-out ones are drawn with the ODE
sampler from fixed noise after every step and scored by the task (the verifier; on task captions the contrastive
scorer's alignment, which the learned reward GRPO optimises is not), with the KL to the reference, so the log shows
whether the policy learns or drifts. With `objective: nft` the same groups and advantages train DiffusionNFT's
forward-process loss instead (kiln/grpo.py `nft_loss`): each kept image's conditional velocity at `nft_timesteps`
fresh (t, noise) draws, against the sampling policy's velocity (cached on the first pass) and, for the logged and
penalised KL, the reference's velocity. Prompts come from the task (stages/tasks.py): the grammar's training
compositions, or the captions of the curated training split.

Under torchrun each of N processes samples and scores the groups of prompts_per_step / N prompts (a group never
spans processes, so advantages stay per group) with its own noise stream, seeded per step and rank so a resumed
run draws the same; gradients are averaged (or reduce-scattered under FSDP2) before each optimizer step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from data.synthetic import KINDS
from kiln import distributed, seeding
from kiln.checkpoint import resolve_checkpoint
from kiln.diffusion import Denoiser, make_process
from kiln.flow import interpolate, sample_timesteps
from kiln.generate import generate_latents, initial_noise, to_pil
from kiln.geometry import latent_channels, token_grid, vae_factor
from kiln.grpo import group_advantages, informative_groups, nft_loss, window_step_losses
from kiln.models import predict, unpack
from kiln.sampler import flow_sigmas, guided_prediction, sample_sde
from kiln.stage_io import StageResult, hash_files
from kiln.text_encoder import text_encoder_for
from kiln.vae import decode_latents, vae_for
from reward.scoring import make_scorer
from stages.common import training_device
from stages.policy import policy_trainer
from stages.tasks import task_for

# Sampling rounds per step before a step trains on groups without signal (at zero advantage): every rank runs the
# same number of rounds, because the decision is taken on the count summed over ranks.
MAX_ROUNDS = 4


def make_reward(cfg, inputs: dict, device):
    """reward(images (B, 3, H, W) in [-1, 1], captions) -> (total (B,), {component: (B,)})."""
    weights = cfg.grpo_reward_weights()
    path = cfg.grpo.reward_model or inputs.get("reward")
    if "reward_model" in weights and path is None:
        raise ValueError("grpo: the reward uses the reward model but there is no reward stage output "
                         "(run the reward stage or set grpo.reward_model)")
    return make_scorer(cfg, weights, path, device, features=inputs.get("features"))


def heldout_probe(cfg, task, encoder, vae, null, resolution: int, device):
    """probe(policy) -> the task's probe scores (synthetic: the verifier's heldout_correct and heldout_score; captions:
    heldout_score, the contrastive scorer's alignment) on `grpo.heldout_prompts` held-out prompts (of the trained
    kinds), drawn with the eval sampler and CFG from noise fixed for the whole stage."""
    gcfg, ecfg = cfg.grpo, cfg.eval
    seed = seeding.grpo_probe(gcfg.seed)
    captions = task.heldout_prompts(gcfg.heldout_prompts, gcfg.seed, gcfg.prompt_kinds)
    text, mask = encoder(captions)

    @torch.no_grad()
    def probe(policy) -> dict[str, float]:
        latents = generate_latents(policy, text, mask, *null, height=resolution, width=resolution,
                                   vae_factor=vae_factor(cfg.vae), steps=gcfg.num_inference_steps, cfg=ecfg.cfg,
                                   sched=cfg.scheduler, generator=torch.Generator(device=device).manual_seed(seed))
        return task.probe_scores(to_pil(decode_latents(vae, latents)), captions)

    return probe


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
        max_grad_norm=gcfg.max_grad_norm, state={"generator": generator}, log_every=1,
        postfix=("reward", "kl", "heldout_correct"))
    trainer.meta["resolution"] = resolution
    device, ranks = trainer.device, trainer.ranks
    if gcfg.prompts_per_step % ranks.world_size:
        raise ValueError(f"grpo: prompts_per_step {gcfg.prompts_per_step} does not split over {ranks.world_size} "
                         f"processes")
    trainer.start()
    vae = vae_for(cfg, Path(inputs["vae"]), device)
    encoder = text_encoder_for(cfg, device)
    reward = make_reward(cfg, inputs, device)
    task = task_for(cfg, inputs, device)
    null_text, null_mask = encoder([cfg.sampler.negative_prompt])  # (1, L0, D)
    probe = heldout_probe(cfg, task, encoder, vae, (null_text, null_mask), resolution, device) \
        if gcfg.heldout_prompts else None

    h = w = resolution // vae_factor(cfg.vae)
    grid = token_grid(h, w)
    sigmas = flow_sigmas(gcfg.num_inference_steps, grid[0] * grid[1], cfg.scheduler).to(device)  # (steps + 1,)
    window = gcfg.sde_window
    n_train = max(1, round(gcfg.timestep_fraction * window))
    group = gcfg.num_generations
    policy = trainer.forward

    def rollout(prompts: list[str], step_rng: random.Random) -> dict:
        """G images per prompt, SDE only in this step's window; rewards, advantages and the window's trajectory."""
        captions = [c for c in prompts for _ in range(group)]  # TRL's layout: each prompt G times in a row
        text, mask = encoder(captions)  # (B, L, D), (B, L)
        null_b, null_mask_b = null_text.expand(len(captions), -1, -1), null_mask.expand(len(captions), -1)
        start = step_rng.randrange(gcfg.sde_window_starts)
        with torch.no_grad():
            velocity = guided_prediction(policy, text, mask, null_b, null_mask_b, gcfg.cfg, grid)
            if gcfg.shared_initial_noise:  # (P, N, D) -> (B, N, D), each prompt's noise G times in a row
                noise = initial_noise(len(prompts), latent_channels(cfg.vae), h, w, generator, device)
                noise = noise.repeat_interleave(group, 0)
            else:
                noise = initial_noise(len(captions), latent_channels(cfg.vae), h, w, generator, device)  # (B, N, D)
            denoiser = Denoiser(velocity, "flow", make_process(None))
            x0, old_log_probs, trajectory = sample_sde(denoiser, noise, sigmas, noise_level=gcfg.noise_level,
                                                       generator=generator, window=(start, start + window))
            images = decode_latents(vae, unpack(x0, h, w))  # (B, 3, H, W)
            rewards, parts = reward(images, captions)  # (B,)
        return {"text": text, "mask": mask, "null": (null_b, null_mask_b), "trajectory": trajectory,  # (B, n+1, N, D)
                "x0": x0,  # (B, N, D)
                "old_log_probs": old_log_probs, "start": start, "rewards": rewards, "parts": parts,
                "advantages": group_advantages(rewards, group, gcfg.scale_rewards).to(device),  # (B,)
                "keep": informative_groups(rewards, group).to(device)}

    def select(batch: dict, keep: torch.Tensor) -> dict:
        rows = lambda t: t[keep]  # noqa: E731
        return {**batch, "text": rows(batch["text"]), "mask": rows(batch["mask"]),
                "null": tuple(rows(t) for t in batch["null"]), "trajectory": rows(batch["trajectory"]),
                "x0": rows(batch["x0"]),
                "old_log_probs": rows(batch["old_log_probs"]), "advantages": rows(batch["advantages"])}

    def sampled_batches():
        """Per step: roll out groups with the current policy until some group's rewards differ (up to MAX_ROUNDS),
        keep only those groups; the same batch serves num_iterations optimizer steps."""
        while True:
            step_rng = random.Random(seeding.grpo_prompts(gcfg.seed, trainer.step))  # this step's prompts, resumable
            if ranks.distributed:  # this process's own noise stream for this step
                generator.manual_seed(seeding.grpo_noise(gcfg.seed, trainer.step, ranks.rank))
            policy.eval()
            # The policy this step's rollouts come from; every rank probes (FSDP2 forwards are collective).
            probed = {} if probe is None else probe(trainer.model)
            rewards, kinds, kept = [], [], 0
            for rounds in range(1, MAX_ROUNDS + 1):
                drawn = task.training_prompts(gcfg.prompts_per_step, step_rng.randrange(2**31), gcfg.prompt_kinds)
                if ranks.distributed:
                    share = gcfg.prompts_per_step // ranks.world_size
                    drawn = drawn[ranks.rank * share:(ranks.rank + 1) * share]
                batch = rollout([c for _, c in drawn], step_rng)
                rewards.append(batch["rewards"])
                kinds += [KINDS.index(kind) if kind in KINDS else -1 for kind, _ in drawn for _ in range(group)]
                kept = int(distributed.mean_across(batch["keep"].sum().float()).item() * ranks.world_size)
                if kept:
                    break
            policy.train()
            keep = batch["keep"]
            if not keep.any():  # nothing to learn from here (or anywhere): one group at zero advantage
                keep = torch.zeros_like(keep)
                keep[:group] = True
                batch["advantages"] = torch.zeros_like(batch["advantages"])
            all_rewards = distributed.gather_rows(torch.cat(rewards).to(device))  # every round, every process
            all_kinds = distributed.gather_rows(torch.tensor(kinds, device=device))
            batch = select(batch, keep)
            batch["metrics"] = {
                "reward": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
                **{f"reward_{name}": distributed.gather_rows(value.to(device)).mean().item()
                   for name, value in batch["parts"].items()},
                **{f"reward_{kind}": all_rewards[all_kinds == i].mean().item() for i, kind in enumerate(KINDS)
                   if (all_kinds == i).any()},
                "informative_groups": kept / group / gcfg.prompts_per_step,  # of the last round's groups
                "sampling_rounds": rounds, "window_start": batch["start"], **probed}
            # The same subset of window steps for the whole batch.
            batch["train_steps"] = sorted(step_rng.sample(range(window), n_train))
            if gcfg.objective == "nft":  # the (t, noise) draws of every pass over this batch: (K, B) and (K, B, N, D)
                rows, k = batch["x0"].shape[0], gcfg.nft_timesteps
                batch["nft_t"] = sample_timesteps(k * rows, grid[0] * grid[1], cfg.objective, cfg.scheduler,
                                                  generator, device).view(k, rows)
                batch["nft_noise"] = torch.randn((k, *batch["x0"].shape), generator=generator, device=device)
            for _ in range(gcfg.num_iterations):
                yield batch

    def guided(model):
        return lambda batch: guided_prediction(model, batch["text"], batch["mask"], *batch["null"], gcfg.cfg, grid)

    def forward_backward(batch: dict) -> dict:
        """The clipped surrogate plus beta * KL on each trained window step, gradients accumulated over them."""
        sums: dict[str, float] = {}
        losses = window_step_losses(
            guided(policy)(batch), guided(reference)(batch), batch["trajectory"], batch["old_log_probs"],
            batch["advantages"], sigmas, batch["start"], batch["train_steps"], noise_level=gcfg.noise_level,
            epsilon=gcfg.epsilon, epsilon_high=gcfg.epsilon_high, beta=gcfg.beta)
        for loss, stats in losses:
            (loss / n_train).backward()
            for key, value in {"loss": loss.detach(), **stats}.items():
                reduce = max if key == "ratio_dev" else lambda a, b: a + b / n_train
                sums[key] = reduce(sums.get(key, 0.0), float(value))
        sums = {k: (distributed.max_across if k == "ratio_dev" else distributed.mean_across)(
            torch.tensor(v, device=device)).item() for k, v in sums.items()}
        return {**sums, **batch["metrics"]}

    def nft_forward_backward(batch: dict) -> dict:
        """DiffusionNFT on the batch's clean images: per (t, noise) draw, the conditional velocity against the
        policy's velocity at the first pass (the sampling policy) and the reference's; gradients accumulated."""
        x0, text, mask, n = batch["x0"], batch["text"], batch["mask"], gcfg.nft_timesteps
        first_pass = "old_velocity" not in batch
        if first_pass:
            batch["old_velocity"] = []
        sums = {"loss": 0.0, "nft_loss": 0.0, "kl": 0.0}
        for k in range(n):
            t, noise = batch["nft_t"][k], batch["nft_noise"][k]  # (B,), (B, N, D)
            x_t = interpolate(x0, noise, t)
            velocity = predict(policy, x_t, t, text, mask, grid)  # (B, N, D)
            with torch.no_grad():
                ref_velocity = predict(reference, x_t, t, text, mask, grid)
            if first_pass:
                batch["old_velocity"].append(velocity.detach())
            per_sample = nft_loss(velocity, batch["old_velocity"][k], noise - x0, batch["advantages"],
                                  beta=gcfg.nft_beta)  # (B,)
            kl = (velocity - ref_velocity).pow(2).mean()  # velocity-space distance to the reference
            loss = per_sample.mean() + gcfg.beta * kl
            (loss / n).backward()
            for key, value in (("loss", loss), ("nft_loss", per_sample.mean()), ("kl", kl)):
                sums[key] += float(value.detach()) / n
        sums = {k: distributed.mean_across(torch.tensor(v, device=device)).item() for k, v in sums.items()}
        return {**sums, **batch["metrics"]}

    trainer.fit(nft_forward_backward if gcfg.objective == "nft" else forward_backward, sampled_batches)
    return StageResult("grpo", out_dir, {"steps": trainer.step}, hash_files(out_dir / "checkpoints"))
