"""Task captions (your own images): the config refuses the synthetic world's stages on real data before compute, and
a real-data smoke run (48 Noto emoji from a package registry, tests/data/noto-emoji) runs every stage under Prefect
with a held-out split no stage trains on, the contrastive scorer, and evaluations that pair across stages."""

import json
from pathlib import Path

import pytest

from kiln.config import ConfigError, load_config

EMOJI = Path(__file__).parent / "data" / "noto-emoji"
SOURCE = f"data.sources=[{{kind: imagefolder, path: {EMOJI}, caption_column: text, category_column: category}}]"


def test_the_task_follows_the_sources_and_refuses_what_it_cannot_judge():
    assert load_config("smoke").task_kind == "synthetic"
    assert load_config("smoke", [SOURCE, "post_training=[]"]).task_kind == "captions"
    real = load_config("tiny", [SOURCE])  # the judges resolve to the captions task's own
    assert (real.preference_judge(), real.grpo_reward_weights()) == ("alignment", {"reward_model": 1.0})
    for option in ("preference.judge=verifier", "grpo.reward=verifier_dense"):
        with pytest.raises(ConfigError) as error:
            load_config("tiny", [SOURCE, option])
        assert "\n" not in str(error.value) and "reads the synthetic grammar" in str(error.value)
    with pytest.raises(ConfigError, match="near_miss_pairs renders synthetic scenes"):
        load_config("tiny", [SOURCE, "preference.near_miss_pairs=8"])
    with pytest.raises(ConfigError, match="synthetic world's verifier cannot judge"):
        load_config("smoke", [SOURCE, "task=synthetic", "post_training=[]"])


def test_the_heldout_split_is_seeded_and_stable():
    from data.curate import is_heldout

    keys = [f"s0u0-{i:07d}" for i in range(4000)]
    share = sum(is_heldout(k, 0, 0.1) for k in keys) / len(keys)
    assert 0.08 < share < 0.12
    assert [is_heldout(k, 0, 0.1) for k in keys] == [is_heldout(k, 0, 0.1) for k in keys]
    assert [is_heldout(k, 0, 0.1) for k in keys] != [is_heldout(k, 1, 0.1) for k in keys]


@pytest.fixture(scope="module")
def emoji_run(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("runs")
    overrides = [f"run_dir={root}", "experiment=kiln-captions", SOURCE, "data.heldout_fraction=0.25",
                 "features.steps=60", "eval.prompts=[a red apple, grinning face]", "reward.data_pairs=16"]
    return root / "emoji", pipeline(preset="smoke", overrides=overrides, run_name="emoji")


def test_a_real_data_smoke_run_evaluates_on_images_no_stage_trained_on(emoji_run):
    from data.shards import iter_samples

    run, outputs = emoji_run
    assert list(outputs) == ["data", "features", "vae", "latents", "pretrain-32", "eval-pretrain-32", "pretrain-64",
                             "eval-pretrain-64", "sft", "eval-sft", "preference", "reward", "dpo", "eval-dpo", "grpo",
                             "eval-grpo"]
    report = json.loads((run / "data" / "funnel_report.json").read_text())
    assert report["conversions"]["transparency composited"] == report["seen"]  # every emoji has a transparent margin
    train = {s["meta"]["source_key"] for s in iter_samples(run / "latents" / "shards", load_images=False)}
    held = {s["meta"]["source_key"] for s in iter_samples(run / "latents" / "heldout", load_images=False)}
    assert held and train and not held & train and len(held | train) == report["kept"]
    features = json.loads((run / "features" / "manifest.json").read_text())["metrics"]
    assert features["features/heldout_images"] == len(held)
    for stage in ("eval-pretrain-32", "eval-pretrain-64", "eval-sft", "eval-dpo", "eval-grpo"):
        metrics = json.loads((run / stage / "manifest.json").read_text())["metrics"]
        for name in ("heldout_loss", "frechet_distance", "frechet_distance_train_images", "alignment",
                     "alignment_real_images", "alignment_other_caption"):
            assert isinstance(metrics[f"eval/captions/{name}"], float), (stage, name)
        assert metrics["eval/captions/generated"] == len(held)
        assert not (run / stage / "samples" / "verifier.json").exists()  # no synthetic prompt was judged
        assert (run / stage / "samples" / "prompts.png").exists()  # the user's validation prompts
    gains = json.loads((run / "eval-pretrain-64" / "manifest.json").read_text())["metrics"]
    low, gain, high = (gains[f"eval/gain/captions/alignment{s}"] for s in ("_low", "", "_high"))
    assert low <= gain <= high
    # Held-out loss pairs only within one resolution: pretrain-64's is over other images than pretrain-32's.
    assert "eval/gain/captions/heldout_loss" not in gains
    assert "eval/gain/captions/heldout_loss" in json.loads((run / "eval-sft" / "manifest.json").read_text())["metrics"]
    from flows.compare import compare

    table = compare(["emoji"], experiment="kiln-captions")  # kiln compare's table: the captions task's columns
    assert "| heldout loss | FD |" in table and "gain alignment" in table and "heldout single" not in table


def test_post_training_on_real_data_asks_the_task_not_the_synthetic_world(emoji_run):
    """SFT trains on the top fraction by clarity, preference samples training captions judged by the contrastive
    scorer, the reward model also learns from real pairs, and GRPO's probe reports held-out alignment."""
    from data.shards import iter_samples

    run, _ = emoji_run
    captions = {s["caption"] for s in iter_samples(run / "latents" / "shards", load_images=False)}
    held = {s["caption"] for s in iter_samples(run / "latents" / "heldout", load_images=False)}
    sft = list(iter_samples(run / "sft" / "shards", load_images=False))
    candidates = [s["meta"]["clarity"] for s in iter_samples(run / "latents" / "shards", load_images=False)
                  if s["bucket"] in {tuple(x["bucket"]) for x in sft}]
    assert sft and min(s["meta"]["clarity"] for s in sft) >= sorted(candidates)[len(candidates) - len(sft)]
    pairs = list(iter_samples(run / "preference" / "shards", load_images=False))
    assert pairs and all(p["caption"] in captions - held for p in pairs)  # training captions only
    grpo = json.loads((run / "grpo" / "manifest.json").read_text())
    assert grpo["metrics"]["steps"] == 2
    from mlflow import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("kiln-captions").experiment_id],
                              "tags.`kiln.stage` = 'grpo'")
    history = client.get_metric_history(runs[0].info.run_id, "train/heldout_score")
    assert len(history) == 2 and all(-1 <= m.value <= 1 for m in history)  # a cosine, every step
    assert not client.get_metric_history(runs[0].info.run_id, "train/heldout_correct")  # no verifier on real data


def test_paired_gains_pair_captions_and_images_and_refuse_other_captions():
    from stages.eval_captions import paired_gains

    before = {"captions": [{"caption": f"c{i}", "alignment": 0.1 * (i % 3)} for i in range(30)],
              "losses": [{"key": f"k{i}", "loss": 1.0 + 0.01 * i} for i in range(20)]}
    after = {"captions": [{**r, "alignment": r["alignment"] + 0.2} for r in before["captions"]],
             "losses": [{**r, "loss": r["loss"] - 0.5} for r in before["losses"]]}
    gains = paired_gains(before, after)
    assert gains["eval/gain/captions/alignment"] == pytest.approx(0.2)
    assert gains["eval/gain/captions/alignment_low"] == pytest.approx(0.2)  # a constant gain: a zero-width interval
    assert gains["eval/gain/captions/heldout_loss"] == pytest.approx(-0.5)
    other = {**after, "captions": [{**r, "caption": "x"} for r in after["captions"]]}
    with pytest.raises(ValueError, match="other captions"):
        paired_gains(before, other)


def test_sft_on_captions_takes_the_top_fraction_by_a_funnel_score_or_your_column(tmp_path):
    """sft.select_by: the funnel's clarity, or a source's quality_column carried into the shards' metadata."""
    import shutil

    from data.curate import curate
    from data.shards import iter_samples
    from stages.sft import select_top

    folder = tmp_path / "emoji"
    shutil.copytree(EMOJI, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({**row, "score": i if i % 5 else "n/a"}) + "\n" for i, row in enumerate(rows)))
    cfg = load_config("smoke", [f"data.sources=[{{kind: imagefolder, path: {folder}, caption_column: text, "
                                f"quality_column: score}}]", "data.funnel.num_proc=1", "data.heldout_fraction=0",
                                "sft.select_by=quality", "sft.top_fraction=0.25"])
    curate(cfg, tmp_path / "shards", lambda c: (__import__("torch").ones(len(c), 2, 4),
                                                 __import__("torch").ones(len(c), 2, dtype=bool)), progress=False)
    metas = [(s["key"], s["meta"]) for s in iter_samples(tmp_path / "shards", buckets=[(64, 64)], load_images=False)]
    scores = {key: meta.get("quality") for key, meta in metas}
    assert sum(v is None for v in scores.values()) == sum(1 for i in range(len(rows)) if i % 5 == 0)  # "n/a": none
    chosen = select_top(metas, cfg.sft)
    assert len(chosen) == round(0.25 * len(metas))
    assert min(scores[k] for k in chosen) > max(v for k, v in scores.items() if k not in chosen and v is not None)
    by_clarity = select_top(metas, cfg.sft.model_copy(update={"select_by": "clarity"}))
    assert min(dict(metas)[k]["clarity"] for k in by_clarity) >= max(
        m["clarity"] for k, m in metas if k not in by_clarity)
