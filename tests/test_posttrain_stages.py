"""Post-training stages on the smoke preset as plain functions (no Prefect, no MLflow): SFT curation, preference
pairs (sampled and loaded in Pick-a-Pic's layout), the reward model, Diffusion-DPO and Flow-GRPO, and resuming."""

import pytest
import torch
from safetensors.torch import load_file

from data.shards import iter_samples
from kiln.checkpoint import latest_checkpoint
from kiln.config import ConfigError, SftConfig, load_config
from kiln.tracking import Tracker
from stages import dpo, grpo, preference, sft
from stages.common import run_without_orchestration
from kiln.trainer import Trainer


class Recorder(Tracker):
    """A Tracker that keeps what the stage logs."""

    def __init__(self):
        super().__init__(None)
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def _cfg(*overrides):
    return load_config("smoke", ["cadence.sample_every=100", *overrides])


@pytest.fixture(scope="module")
def pretrained(smoke_latents, tmp_path_factory):
    root = tmp_path_factory.mktemp("post")
    inputs = {"latents": smoke_latents / "latents", "vae": smoke_latents / "vae"}
    run_without_orchestration([("pretrain", "pretrain", inputs)], _cfg(), root)
    return root, smoke_latents


@pytest.fixture(scope="module")
def labelled_pairs(pretrained, pickapic_parquet, tmp_path_factory):
    root, latents = pretrained
    out = tmp_path_factory.mktemp("pairs")
    cfg = _cfg(f"preference.dataset={pickapic_parquet}")
    run_without_orchestration([("preference", "preference", {"model": root / "pretrain", "vae": latents / "vae"})],
                              cfg, out)
    return out / "preference"


def test_curation_keeps_clean_centred_separated_scenes():
    metas = [
        ("centred", {"kind": "single", "objects": [[0.3, 0.3, 0.6, 0.6]]}),
        ("at-edge", {"kind": "single", "objects": [[0.0, 0.3, 0.3, 0.6]]}),
        ("apart", {"kind": "relation", "objects": [[0.1, 0.4, 0.3, 0.6], [0.6, 0.4, 0.8, 0.6]]}),
        ("too-close", {"kind": "relation", "objects": [[0.1, 0.4, 0.3, 0.6], [0.32, 0.4, 0.52, 0.6]]}),
        ("no-boxes", {"kind": "count"}),
        ("centred-2", {"kind": "single", "objects": [[0.4, 0.4, 0.5, 0.5]]}),
    ]
    loose = SftConfig(centre_margin=0.08, min_gap=0.1, balance_kinds=False)
    assert sft.select(metas, loose, seed=0) == {"centred", "apart", "centred-2"}
    balanced = sft.select(metas, SftConfig(centre_margin=0.08, min_gap=0.1), seed=0)
    assert len(balanced) == 2 and "apart" in balanced  # one single, one relation
    relations_only = SftConfig(centre_margin=0.08, min_gap=0.1, balance_kinds=False, kinds=["relation"])
    assert sft.select(metas, relations_only, seed=0) == {"apart"}


def test_sft_trains_on_the_curated_subset(pretrained, tmp_path):
    root, latents = pretrained
    cfg = _cfg("sft.centre_margin=0.05", "sft.min_gap=0.05", "sft.balance_kinds=false")
    run_without_orchestration([("sft", "sft", {"latents": latents / "latents", "vae": latents / "vae",
                                                "init": root / "pretrain"})], cfg, tmp_path)
    kept = list(iter_samples(tmp_path / "sft" / "shards", load_images=False))
    everything = [s for s in iter_samples(latents / "latents" / "shards", load_images=False)
                  if s["meta"]["resolution"] == cfg.train.rungs[-1].resolution]
    assert 0 < len(kept) < len(everything)
    assert all(sft.is_curated(s["meta"], 0.05, 0.05) for s in kept)
    final = latest_checkpoint(tmp_path / "sft" / "checkpoints")
    assert final.name == f"step-{cfg.sft.steps}"
    start = load_file(str(latest_checkpoint(root / "pretrain" / "checkpoints") / "ema.safetensors"))
    tuned = load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(start[k], tuned[k]) for k in start)


def test_sft_with_too_strict_curation_says_so(pretrained, tmp_path):
    root, latents = pretrained
    with pytest.raises(ValueError, match=r"sft: only 0 of \d+ samples at 64px pass curation"):
        run_without_orchestration([("sft", "sft", {"latents": latents / "latents", "vae": latents / "vae",
                                                    "init": root / "pretrain"})],
                                  _cfg("sft.centre_margin=0.49"), tmp_path)


def test_pairs_load_from_a_pickapic_layout_dataset(labelled_pairs, pretrained, pickapic_parquet):
    import pandas as pd

    from kiln.images import image_tensor
    from kiln.vae import encode_images, vae_for
    from stages.preference import _as_image, _square

    _, latents = pretrained
    pairs = list(iter_samples(labelled_pairs / "shards", load_images=False))
    assert len(pairs) == 8  # 12 rows, every third a tie
    assert all(p["meta"]["score_chosen"] == 1.0 and p["meta"]["score_rejected"] == 0.0 for p in pairs)
    rows = pd.read_parquet(pickapic_parquet)
    # Row 1 has label 0: image 1 is the chosen one. Pairs are keyed in row order, ties skipped.
    vae = vae_for(_cfg(), latents / "vae", "cpu")
    with torch.no_grad():
        expected = encode_images(vae, image_tensor(_square(_as_image(rows["jpg_1"][1]), 32))[None])[0]
    assert pairs[1]["caption"] == rows["caption"][1]
    assert pairs[1]["chosen"].shape == (4, 4, 4)  # the model trained at 32 px; z_dim 4, 8x VAE
    torch.testing.assert_close(pairs[1]["chosen"].float(), expected, atol=2e-3, rtol=2e-3)  # stored as float16


def test_pair_dataset_with_a_wrong_column_names_what_exists(pretrained, pickapic_parquet, tmp_path):
    root, latents = pretrained
    cfg = _cfg(f"preference.dataset={pickapic_parquet}", "preference.caption_column=prompt")
    with pytest.raises(ValueError, match=r"has no column\(s\) prompt \(it has: caption, jpg_0, jpg_1, label_0\)"):
        run_without_orchestration([("preference", "preference", {"model": root / "pretrain",
                                                                  "vae": latents / "vae"})], cfg, tmp_path)


def test_sampled_pairs_keep_best_against_worst(pretrained, tmp_path, monkeypatch):
    root, latents = pretrained
    # A planted judge: per prompt of 3 samples, scores (0.2, 0.9, 0.5), except every third prompt ties.
    calls = []

    def judge(images, captions):
        calls.append(captions)
        scores = []
        for i in range(0, len(images), 3):
            prompt = sum(len(c) for c in calls[:-1]) // 3 + i // 3
            scores += [0.5, 0.5, 0.5] if prompt % 3 == 2 else [0.2, 0.9, 0.5]
        return scores

    monkeypatch.setattr(preference, "make_judge", lambda cfg, inputs, device: judge)
    cfg = _cfg()  # smoke: 6 prompts x 3 samples
    run_without_orchestration([("preference", "preference", {"model": root / "pretrain", "vae": latents / "vae"})],
                              cfg, tmp_path)
    pairs = list(iter_samples(tmp_path / "preference" / "shards", load_images=False))
    assert len(pairs) == 4
    assert all((p["meta"]["score_chosen"], p["meta"]["score_rejected"]) == pytest.approx((0.9, 0.2)) for p in pairs)
    assert not torch.equal(pairs[0]["chosen"], pairs[0]["rejected"])


def _bradley_terry_loss_on(model, pairs_dir):
    """The reward model's mean Bradley-Terry loss over every preference record's best against worst image."""
    from data.shards import pad_and_stack
    from reward.model import bradley_terry_loss

    records = list(iter_samples(pairs_dir / "shards", load_images=False))
    better = torch.stack([r["images"][r["scores"].argmax()] for r in records]).float() / 127.5 - 1  # (N, 3, H, W)
    worse = torch.stack([r["images"][r["scores"].argmin()] for r in records]).float() / 127.5 - 1
    text = pad_and_stack([r["text_emb"].float() for r in records])  # (N, L, D)
    mask = pad_and_stack([r["text_mask"].bool() for r in records])  # (N, L)
    with torch.no_grad():
        return bradley_terry_loss(model(better, text, mask), model(worse, text, mask)).item()


def test_reward_stage_trains_and_reports_held_out_accuracy(labelled_pairs, pretrained, tmp_path):
    from reward.model import load_reward_model
    from stages import reward

    _, latents = pretrained
    inputs = {"pairs": labelled_pairs, "vae": latents / "vae"}
    # One step leaves the model where it started (loss log 2); 20 steps of 4 pairs go over the 6 training pairs
    # many times (at 3x the default lr, to keep it short).
    barely = reward.run(_cfg("reward.steps=1", "reward.lr=3e-3"), inputs, tmp_path / "one-step", Tracker(None))
    result = reward.run(_cfg("reward.steps=20", "reward.lr=3e-3"), inputs, tmp_path, Tracker(None))
    assert result.metrics["reward/pairs_val"] + result.metrics["reward/pairs_train"] == 8
    assert (result.metrics["reward/prompts_train"], result.metrics["reward/prompts_val"]) == (6, 2)
    # Training lowered the loss on the pairs (6 of the 8 are its training pairs; measured 0.693 -> 0.209) and ranks
    # more of its training pairs right (measured 1/3 -> 1).
    before = _bradley_terry_loss_on(load_reward_model(tmp_path / "one-step"), labelled_pairs)
    after = _bradley_terry_loss_on(load_reward_model(tmp_path), labelled_pairs)
    assert before == pytest.approx(0.693, abs=0.01) and after < 0.6 * before, (before, after)
    assert result.metrics["reward/train_accuracy"] > barely.metrics["reward/train_accuracy"]
    assert 0.0 <= result.metrics["reward/val_accuracy"] <= 1.0  # 2 held-out prompts: too few to ask more of
    model = load_reward_model(tmp_path)
    assert model(torch.zeros(2, 3, 64, 64), torch.zeros(2, 5, 384), torch.ones(2, 5, dtype=torch.bool)).shape == (2,)

    # Extra pairs from the rendered training data (the pairs' resolution: 32 px), ordered by the verifier.
    with_data = reward.run(_cfg("reward.steps=2", "reward.data_pairs=10"),
                           {"pairs": labelled_pairs, "vae": latents / "vae", "data": latents / "data"},
                           tmp_path / "with-data", Tracker(None)).metrics
    assert 0 < with_data["reward/data_pairs"] <= 10
    assert with_data["reward/pairs_train"] == result.metrics["reward/pairs_train"] + with_data["reward/data_pairs"]


def test_reward_stage_splits_the_prompts_whose_images_score_differently(tmp_path, monkeypatch):
    """Tied records hold no pairs: they are left out of the split, so a few informative prompts still validate, one
    trains alone (val accuracy NaN, said so), and none is a one-line error."""
    import math

    from stages import reward

    def fake_records(scores):
        n = len(scores)
        images = torch.randint(0, 256, (n, 2, 3, 32, 32), dtype=torch.uint8)
        texts = [(torch.randn(5, 384), torch.ones(5, dtype=torch.bool)) for _ in range(n)]
        return lambda _: (images, torch.tensor(scores, dtype=torch.float), texts)

    cfg = _cfg("reward.steps=2")
    five_tied = [[1.0, 1.0]] * 5 + [[1.0, 0.0], [0.0, 1.0], [0.5, 1.0]]
    monkeypatch.setattr(reward, "_records", fake_records(five_tied))
    metrics = reward.run(cfg, {"pairs": tmp_path}, tmp_path / "three", Tracker(None)).metrics
    assert (metrics["reward/prompts_train"], metrics["reward/prompts_val"]) == (2, 1)  # val_fraction 0.2 of 3, at least 1
    assert (metrics["reward/pairs_train"], metrics["reward/pairs_val"]) == (2, 1)

    monkeypatch.setattr(reward, "_records", fake_records([[1.0, 1.0]] * 7 + [[1.0, 0.0]]))
    metrics = reward.run(cfg, {"pairs": tmp_path}, tmp_path / "one", Tracker(None)).metrics
    assert (metrics["reward/pairs_train"], metrics["reward/pairs_val"]) == (1, 0)
    assert math.isnan(metrics["reward/val_accuracy"])

    monkeypatch.setattr(reward, "_records", fake_records([[1.0, 1.0]] * 8))
    with pytest.raises(ValueError, match="no differently scored images among the 8 prompts"):
        reward.run(cfg, {"pairs": tmp_path}, tmp_path / "none", Tracker(None))


def test_dpo_trains_the_policy_to_prefer_the_chosen_images_of_its_pairs(labelled_pairs, pretrained, tmp_path):
    """After DPO, the policy's flow-matching error on each pair's chosen latent, relative to the rejected one, is
    lower than the reference's (the init's EMA): DPO's implicit reward margin is positive. Measured on the 8
    training pairs at fresh draws of t and noise (not the ones trained on); at the start every margin is exactly 0."""
    from data.shards import pad_and_stack
    from kiln.checkpoint import load_weights, resolve_checkpoint
    from kiln.dpo import preference_errors
    from kiln.models import build_backbone

    root, latents = pretrained
    cfg = _cfg("dpo.max_steps=8", "dpo.per_device_train_batch_size=4")  # 4 epochs of the 8 pairs
    dpo.run(cfg, {"pairs": labelled_pairs, "init": root / "pretrain", "vae": latents / "vae"}, tmp_path, Tracker(None))

    def model(stage_dir, which):
        module = build_backbone(cfg.model, cfg.vae.z_dim, cfg.text_encoder.dim)
        load_weights(resolve_checkpoint(stage_dir), module, which)
        return module.eval()

    policy, reference = model(tmp_path, "model"), model(root / "pretrain", "ema")
    pairs = list(iter_samples(labelled_pairs / "shards", load_images=False))
    chosen = torch.stack([p["chosen"] for p in pairs]).float()  # (8, C, h, w)
    rejected = torch.stack([p["rejected"] for p in pairs]).float()
    text = pad_and_stack([p["text_emb"].float() for p in pairs])  # (8, L, D)
    mask = pad_and_stack([p["text_mask"].bool() for p in pairs])  # (8, L)
    generator, margins = torch.Generator().manual_seed(1234), []
    with torch.no_grad():
        for _ in range(8):  # draws of (t, noise) per pair, shared by its chosen and rejected latents
            t, noise = torch.rand(len(pairs), generator=generator), torch.randn(chosen.shape, generator=generator)
            policy_chosen, policy_rejected = preference_errors(policy, chosen, rejected, text, mask, t, noise)
            ref_chosen, ref_rejected = preference_errors(reference, chosen, rejected, text, mask, t, noise)
            # (8,): DPO's implicit reward margin divided by beta
            margins.append((ref_chosen - ref_rejected) - (policy_chosen - policy_rejected))
    margins = torch.stack(margins)  # (draws, pairs)
    # Measured at 9d868ce: mean 5.5e-5 (the errors are ~2.5), positive in 58 of the 64 (draw, pair) cases.
    assert margins.mean() > 0
    assert (margins > 0).float().mean() > 0.65  # the implicit reward accuracy, from 0 at the start


@pytest.mark.parametrize("stage", ["dpo", "grpo", "grpo_nft"])
def test_preference_stages_resume_to_identical_weights(stage, labelled_pairs, pretrained, tmp_path, monkeypatch,
                                                       crash_at):
    root, latents = pretrained
    module = {"dpo": dpo, "grpo": grpo, "grpo_nft": grpo}[stage]
    # nft: two passes over each sampled batch, the second against the first pass's (cached) velocities.
    nft = ["grpo.objective=nft", "grpo.num_iterations=2", "grpo.max_steps=4"] if stage == "grpo_nft" else []
    cfg = _cfg("cadence.checkpoint_every=2", "cadence.keep_checkpoints=5", "dpo.max_steps=4", "grpo.max_steps=3",
               "grpo.reward=verifier", *nft)
    inputs = {"pairs": labelled_pairs, "init": root / "pretrain", "vae": latents / "vae"}

    def brightness_reward():  # a reward that differs within every group of the smoke model's images
        if stage == "grpo_nft":
            reward = lambda images, captions: (images.mean(dim=(1, 2, 3)), {"brightness": images.mean(dim=(1, 2, 3))})
            monkeypatch.setattr(grpo, "make_reward", lambda *args: reward)

    brightness_reward()
    recorder = Recorder()
    module.run(cfg, inputs, tmp_path / "straight", recorder)
    logged = {k for m in recorder.metrics for k in m}
    if stage == "dpo":
        assert {"train/loss", "train/rewards/accuracies", "train/rewards/margins"} <= logged
    elif stage == "grpo_nft":
        assert {"train/reward", "train/kl", "train/nft_loss", "train/reward_brightness", "train/informative_groups",
                "train/heldout_correct", "train/heldout_score"} <= logged
        kl = [m["train/kl"] for m in recorder.metrics if "train/kl" in m]
        assert kl[0] == 0.0 and max(kl) > 0  # the policy starts at the reference and leaves it
    else:
        assert {"train/reward", "train/kl", "train/clipfrac", "train/reward_verifier", "train/ratio_dev",
                "train/informative_groups", "train/heldout_correct", "train/heldout_score"} <= logged

    crash_at(3 if stage == "dpo" else 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        module.run(cfg, inputs, tmp_path / "crashed", Tracker(None))
    monkeypatch.undo()
    brightness_reward()
    module.run(cfg, inputs, tmp_path / "crashed", Tracker(None))  # resumes from step 2
    a = load_file(str(latest_checkpoint(tmp_path / "straight" / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "crashed" / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_preference_stages_checkpoint_on_sigterm(stage, labelled_pairs, pretrained, tmp_path, monkeypatch):
    import os
    import signal

    from kiln.preemption import Preempted

    root, latents = pretrained
    module = {"dpo": dpo, "grpo": grpo}[stage]
    cfg = _cfg("cadence.checkpoint_every=100", "dpo.max_steps=3", "grpo.max_steps=3", "grpo.reward=verifier")
    inputs = {"pairs": labelled_pairs, "init": root / "pretrain", "vae": latents / "vae"}
    module.run(cfg, inputs, tmp_path / "straight", Tracker(None))
    original = Trainer.train_step

    def preempted_after_first(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", preempted_after_first)
    with pytest.raises(Preempted, match=f"{stage}: stopped by SIGTERM at step 1"):
        module.run(cfg, inputs, tmp_path / "preempted", Tracker(None))
    assert latest_checkpoint(tmp_path / "preempted" / "checkpoints").name == "step-1"
    monkeypatch.undo()
    module.run(cfg, inputs, tmp_path / "preempted", Tracker(None))
    a = load_file(str(latest_checkpoint(tmp_path / "straight" / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "preempted" / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_reward_can_be_the_learned_model_or_a_weighted_sum(labelled_pairs, pretrained, tmp_path, monkeypatch):
    from stages import reward

    root, latents = pretrained
    # A smoke model draws nothing the verifier accepts (it scores 0): a planted verifier gives its term a value.
    monkeypatch.setattr("reward.verifier.score", lambda image, caption: 0.5)
    # One sampling round per step: near-equal rewards must not trigger a second round in one run and not the other.
    monkeypatch.setattr(grpo, "MAX_ROUNDS", 1)
    reward.run(_cfg("reward.steps=2"), {"pairs": labelled_pairs, "vae": latents / "vae"}, tmp_path / "rm", Tracker(None))
    logged = {}
    for kind in ("reward_model", "weighted"):
        recorder = Recorder()
        grpo.run(_cfg(f"grpo.reward={kind}", "grpo.max_steps=1",
                      "grpo.reward_weights={verifier: 0.25, reward_model: 2.0}"),
                 {"init": root / "pretrain", "vae": latents / "vae", "reward": tmp_path / "rm"}, tmp_path / kind,
                 recorder)
        (logged[kind],) = [m for m in recorder.metrics if "train/reward" in m]  # max_steps=1: one step logged
    only_model, weighted = logged["reward_model"], logged["weighted"]
    assert "train/reward_verifier" not in only_model
    assert only_model["train/reward"] == pytest.approx(only_model["train/reward_reward_model"], rel=1e-6)
    # The first step's samples do not depend on the reward (same seed, nothing trained yet): both runs scored the same
    # images with the same learned model, and the weighted reward is the configured sum of its parts.
    assert weighted["train/reward_reward_model"] == pytest.approx(only_model["train/reward_reward_model"], rel=1e-6)
    assert weighted["train/reward_verifier"] == 0.5
    assert weighted["train/reward"] == pytest.approx(
        0.25 * weighted["train/reward_verifier"] + 2.0 * weighted["train/reward_reward_model"], rel=1e-5, abs=1e-6)


def test_reward_pairs_are_every_differently_scored_two_of_a_prompt():
    from stages.reward import ordered_pairs

    scores = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    rows = ordered_pairs(scores, torch.tensor([0, 1]))
    assert sorted(map(tuple, rows.tolist())) == [(0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 2, 1), (0, 3, 1)]


def test_preference_judged_by_a_learned_reward_model(labelled_pairs, pretrained, tmp_path):
    from stages import reward

    root, latents = pretrained
    reward.run(_cfg("reward.steps=2"), {"pairs": labelled_pairs, "vae": latents / "vae"}, tmp_path / "rm", Tracker(None))
    cfg = _cfg("preference.judge=reward_model", f"preference.reward_model={tmp_path / 'rm'}")
    run_without_orchestration([("preference", "preference", {"model": root / "pretrain", "vae": latents / "vae"})],
                              cfg, tmp_path)
    records = list(iter_samples(tmp_path / "preference" / "shards", load_images=False))
    assert len(records) == cfg.preference.prompts  # a continuous reward practically never ties
    for r in records:
        assert r["scores"].shape == (3,) and r["images"].shape == (3, 3, 32, 32)
        assert r["meta"]["score_chosen"] == pytest.approx(float(r["scores"].max()), rel=1e-2, abs=1e-2)


def test_default_judge_is_the_verifier():
    import random

    from data.synthetic import SceneSpec, render

    judge = preference.make_judge(_cfg(), {}, "cpu")
    image, _ = render(SceneSpec("single", "red", "circle"), 64, 64, random.Random(0))
    assert judge([image, image], ["a red circle", "a blue square"]) == [1.0, 0.0]


def test_grpo_prompts_cycle_through_the_configured_kinds():
    from data.synthetic import make_holdout, parse_caption
    from stages.tasks import SyntheticTask

    cfg = load_config("tiny", ["grpo.prompt_kinds=[count, relation]"])
    prompts = SyntheticTask(cfg).training_prompts(8, seed=3, kinds=cfg.grpo.prompt_kinds)
    assert [kind for kind, _ in prompts] == ["count", "relation"] * 4
    held_out = make_holdout(cfg.data.holdout_seed).pairs
    for kind, text in prompts:
        spec = parse_caption(text)
        assert spec.kind == kind and (spec.colour, spec.shape) not in held_out
    with pytest.raises(ConfigError, match=r"^config: bad value for 'grpo\.prompt_kinds\.0': .*'single', 'count' or "
                                          r"'relation' \(got 'squares'\)$"):
        load_config("tiny", ["grpo.prompt_kinds=[squares]"])


def test_reward_stage_checkpoints_on_sigterm_and_resumes_identically(labelled_pairs, pretrained, tmp_path,
                                                                     monkeypatch):
    import os
    import signal

    from kiln.preemption import Preempted
    from stages import reward

    _, latents = pretrained
    cfg = _cfg("reward.steps=5", "cadence.checkpoint_every=100")
    inputs = {"pairs": labelled_pairs, "vae": latents / "vae"}
    reward.run(cfg, inputs, tmp_path / "straight", Tracker(None))
    calls = []
    original = reward.bradley_terry_loss

    def preempted_at_third(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)

    monkeypatch.setattr(reward, "bradley_terry_loss", preempted_at_third)
    with pytest.raises(Preempted, match="reward: stopped by SIGTERM at step 3"):
        reward.run(cfg, inputs, tmp_path / "preempted", Tracker(None))
    assert latest_checkpoint(tmp_path / "preempted" / "checkpoints").name == "step-3"
    monkeypatch.undo()
    reward.run(cfg, inputs, tmp_path / "preempted", Tracker(None))
    a = load_file(str(tmp_path / "straight" / "reward_model.safetensors"))
    b = load_file(str(tmp_path / "preempted" / "reward_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "preempted" / "checkpoints").exists()  # finished: only the model is the output


def _metric_history(run_id, key):
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def _new_mlflow_run(name):
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("kiln-posttrain-dp") or client.get_experiment(
        client.create_experiment("kiln-posttrain-dp"))
    return client.create_run(experiment.experiment_id, run_name=name).info.run_id


def test_dpo_on_two_processes_follows_one_process(labelled_pairs, pretrained, tmp_path):
    from stages.worker import launch

    root, latents = pretrained
    inputs = {"pairs": labelled_pairs, "init": root / "pretrain", "vae": latents / "vae"}
    sets = ["dpo.max_steps=4", "cadence.log_every=1", "cadence.checkpoint_every=100"]
    one_run, two_run = _new_mlflow_run("one"), _new_mlflow_run("two")
    dpo.run(_cfg(*sets, "dpo.per_device_train_batch_size=4"), inputs, tmp_path / "one", Tracker(one_run))
    (tmp_path / "two").mkdir()
    launch("dpo", _cfg(*sets, "dpo.per_device_train_batch_size=2", "distributed.nproc_per_node=2"), inputs,
           tmp_path / "two", two_run, None)  # the same global batch of 4 pairs, 2 per process
    one, two = _metric_history(one_run, "train/loss"), _metric_history(two_run, "train/loss")
    assert [s for s, _ in two] == [1, 2, 3, 4]  # rank 0 alone logs
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-4, abs=1e-6)
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-4" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-4" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-5


@pytest.mark.parametrize("lora", [[], ["lora.stages=[grpo]", "lora.rank=4"]], ids=["full", "lora"])
def test_grpo_on_two_fsdp_processes_resumes_exactly_and_in_one_process(lora, labelled_pairs, pretrained, tmp_path):
    """lora: the policy's reference is the sharded policy with its adapter switched off."""
    import shutil

    from stages.worker import launch

    root, latents = pretrained
    inputs = {"init": root / "pretrain", "vae": latents / "vae"}
    cfg = _cfg("grpo.max_steps=2", "grpo.reward=verifier", "cadence.checkpoint_every=1", "cadence.keep_checkpoints=5",
               "distributed.nproc_per_node=2", "distributed.strategy=fsdp", *lora)
    run_id = _new_mlflow_run("grpo-fsdp")
    (tmp_path / "straight").mkdir()
    launch("grpo", cfg, inputs, tmp_path / "straight", run_id, None)
    assert [s for s, _ in _metric_history(run_id, "train/reward")] == [1, 2]
    assert (tmp_path / "straight" / "checkpoints" / "step-1" / "optimizer").is_dir()  # sharded
    for resumed, processes in (("two", 2), ("one", 1)):
        shutil.copytree(tmp_path / "straight", tmp_path / resumed)
        shutil.rmtree(tmp_path / resumed / "checkpoints" / "step-2")
        if processes == 2:  # resumes from the sharded step 1 and draws what the straight run drew
            launch("grpo", cfg, inputs, tmp_path / resumed, None, None)
        else:  # the same shards into one process
            grpo.run(_cfg("grpo.max_steps=2", "grpo.reward=verifier", *lora), inputs, tmp_path / resumed,
                     Tracker(None))
        assert (tmp_path / resumed / "checkpoints" / "step-2" / "model.safetensors").exists()
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-2" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-2" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_sampled_pairs_take_the_configured_kinds_and_score_gap(pretrained, monkeypatch):
    """preference.kinds picks the prompts' scene kinds; a prompt gives a pair only when its best and worst samples'
    scores differ by at least preference.min_score_gap (a planted judge: prompt i's samples score 0 and i/8)."""
    from kiln.vae import vae_for
    from stages.sampling import load_stage

    root, latents = pretrained
    cfg = _cfg("preference.prompts=8", "preference.kinds=[count]", "preference.min_score_gap=0.5")
    k = cfg.preference.samples_per_prompt
    judged = []

    def planted_judge(cfg, inputs, device):
        def judge(images, captions):
            scores = []
            for i in range(len(captions) // k):
                gap = (len(judged) + i) / 8
                scores += [0.0, gap] + [0.0] * (k - 2)
            judged.extend(captions[::k])
            return scores
        return judge

    monkeypatch.setattr(preference, "make_judge", planted_judge)
    _, model, vae_dir, meta = load_stage(root / "pretrain", "cpu")
    records = list(preference.sample_pairs(cfg, {}, model, vae_for(cfg, latents / "vae", "cpu"), meta["resolution"],
                                           "cpu"))
    assert len(judged) == 8
    assert [r[0] for r in records] == ["count"] * 4  # prompts 4..7: gaps 0.5, 0.625, 0.75, 0.875
    assert [r[1] for r in records] == judged[4:]
    assert [float(r[5].max() - r[5].min()) for r in records] == [0.5, 0.625, 0.75, 0.875]


def test_lora_dpo_on_two_processes_follows_one_process(labelled_pairs, pretrained, tmp_path):
    """DDP with an adapter: the frozen base is replicated, the adapter's gradients averaged; two processes of 2 pairs
    train the adapter one process of 4 pairs trains."""
    from stages.worker import launch

    root, latents = pretrained
    inputs = {"pairs": labelled_pairs, "init": root / "pretrain", "vae": latents / "vae"}
    sets = ["dpo.max_steps=3", "cadence.log_every=1", "cadence.checkpoint_every=100", "lora.stages=[dpo]",
            "lora.rank=4", "dpo.learning_rate=0.01"]
    dpo.run(_cfg(*sets, "dpo.per_device_train_batch_size=4"), inputs, tmp_path / "one", Tracker(None))
    (tmp_path / "two").mkdir()
    launch("dpo", _cfg(*sets, "dpo.per_device_train_batch_size=2", "distributed.nproc_per_node=2"), inputs,
           tmp_path / "two", None, None)
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-3" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-3" / "model.safetensors"))
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-5
    assert max(v.abs().max().item() for k, v in a.items() if ".lora_B." in k) > 1e-3  # the adapter trained


def test_near_miss_pairs_are_rendered_scenes_against_their_near_misses(pretrained, tmp_path):
    """preference.near_miss_pairs adds rendered pairs (kinds in turn) to the sampled ones; the verifier ranks every
    kept scene over its near miss, and the two latents differ."""
    root, latents = pretrained
    # No sampled pair clears a score gap above 1, so every record here is a near miss.
    cfg = _cfg("preference.near_miss_pairs=6", "preference.min_score_gap=1.5", "preference.kinds=[count,relation]")
    run_without_orchestration([("preference", "preference", {"model": root / "pretrain", "vae": latents / "vae"})],
                              cfg, tmp_path)
    pairs = list(iter_samples(tmp_path / "preference" / "shards", load_images=False))
    assert sorted(p["meta"]["kind"] for p in pairs) == ["near_miss_count"] * 3 + ["near_miss_relation"] * 3
    assert all(p["meta"]["score_chosen"] == 1.0 > p["meta"]["score_rejected"] for p in pairs)
    assert all(not torch.equal(p["chosen"], p["rejected"]) for p in pairs)
