"""Every seed the pipeline derives from a configured one, each stream named in one place.

Streams that use a configured seed as it is (the vae, features and reward stages' cfg.seed, preference.seed, the
GRPO sampler's first seed, eval.seed for prompts) are not listed. The arithmetic below is frozen: changing any
of it changes every run's numbers, so add a stream rather than edit one.
"""

from __future__ import annotations


def rung(seed: int, index: int) -> int:
    """Pretrain rung `index` of the ladder (SFT: one past the last rung): model init, then t, noise and caption
    dropout. Each rung draws its own stream."""
    return seed * 1000 + index


def vae_attempt(seed: int, attempt: int) -> int:
    """The VAE stage's init and crops on `attempt` (0: the configured seed itself; later ones after a failed
    reconstruction check)."""
    return seed if attempt == 0 else seed * 1000003 + 17 * attempt


def dpo(seed: int) -> int:
    """The DPO stage's t and noise: the rung family's stream 101, past any ladder's rungs."""
    return rung(seed, 101)


def grpo_prompts(seed: int, step: int) -> int:
    """The training prompts GRPO samples at `step` (a resumed run draws the same)."""
    return seed * 100003 + step


def grpo_noise(seed: int, step: int, rank: int) -> int:
    """Process `rank`'s sampling noise at GRPO `step` under torchrun (a resumed run draws the same)."""
    return seed * 1000003 + step * 1009 + rank


def grpo_probe(seed: int) -> int:
    """GRPO's held-out probe: the phrasing of its prompts and its sampling noise, fixed for the whole stage."""
    return seed * 1000003 - 1


def shard_shuffle(seed: int, epoch: int) -> int:
    """The order of shards, and of samples within each, in `epoch` of a BucketBatches loader."""
    return seed * 1000003 + epoch


def synthetic_scene(seed: int, resolution: int, index: int) -> str:
    """Scene `index` of the synthetic source at one resolution (a string: random.Random hashes it)."""
    return f"{seed}:{resolution}:{index}"


def eval_batch(seed: int, start: int) -> int:
    """The eval stage's sampling noise for the batch of prompts starting at `start`."""
    return seed + start


def eval_baseline(seed: int) -> int:
    """The eval stage's baseline: each image checked against a random caption of its split and kind."""
    return seed + 1


def near_miss(seed: int) -> int:
    """The preference stage's rendered near-miss pairs (their scenes and phrasing), apart from its sampled prompts."""
    return seed * 1000003 + 7
