"""The paired bootstrap interval on planted data."""

import numpy as np
import pytest

from kiln.stats import paired_bootstrap_ci


def test_no_change_gives_zero_and_a_zero_width_interval():
    scores = np.random.default_rng(0).random(50)
    assert paired_bootstrap_ci(scores, scores) == (0.0, 0.0, 0.0)


def test_a_constant_gain_is_recovered_exactly():
    before = np.random.default_rng(1).random(40)
    gain, low, high = paired_bootstrap_ci(before, before + 0.2)
    assert gain == pytest.approx(0.2) and low == pytest.approx(0.2) and high == pytest.approx(0.2)


def test_interval_matches_the_normal_approximation_and_covers_the_planted_gain():
    """Per-prompt gains ~ N(0.1, 0.3^2), 400 prompts: the 95% interval is mean +- 1.96 * 0.3 / 20 (about +-0.029)."""
    rng = np.random.default_rng(2)
    before = rng.random(400)
    after = before + rng.normal(0.1, 0.3, 400)
    gain, low, high = paired_bootstrap_ci(before, after)
    half = 1.96 * (after - before).std(ddof=1) / np.sqrt(400)
    assert low == pytest.approx(gain - half, abs=0.004) and high == pytest.approx(gain + half, abs=0.004)
    assert low < 0.1 < high


def test_pairing_removes_the_prompt_to_prompt_spread():
    """Prompts differ a lot in difficulty (0 to 1) but every one gains 0.05 +- 0.02: unpaired, that gain would be lost
    in the spread; paired, the interval excludes zero."""
    rng = np.random.default_rng(3)
    difficulty = rng.random(48)
    gain, low, high = paired_bootstrap_ci(difficulty, difficulty + rng.normal(0.05, 0.02, 48))
    assert 0 < low < gain < high < 0.1


def test_noise_alone_gives_an_interval_around_zero():
    rng = np.random.default_rng(4)
    before, after = rng.integers(0, 2, 48), rng.integers(0, 2, 48)  # two coin-flip evaluations of the same prompts
    _, low, high = paired_bootstrap_ci(before, after)
    assert low < 0 < high


def test_unpaired_inputs_are_a_clear_error():
    with pytest.raises(ValueError, match=r"needs two equal-length 1-d score lists, got shapes \(3,\) and \(4,\)"):
        paired_bootstrap_ci([1, 2, 3], [1, 2, 3, 4])


def _rows(single_right: list[bool], count_right: list[bool], images_per_prompt: int = 2):
    rows = []
    for kind, verdicts in (("single", single_right), ("count", count_right)):
        for p, right in enumerate(verdicts):
            rows += [{"split": "heldout", "kind": kind, "caption": f"{kind} prompt {p}", "colour_shape": right,
                      "count": right, "relation": None, "score": float(right)}] * images_per_prompt
    return rows


def test_eval_gain_pairs_prompts_and_groups_their_images():
    from stages.eval import paired_gains

    before = _rows([False] * 6, [True, False, True, False])
    after = _rows([True] * 6, [True, False, True, False])
    gains = paired_gains(before, after, images_per_prompt=2)
    single = "eval/gain/heldout/single/colour_shape"
    assert (gains[single], gains[single + "_low"], gains[single + "_high"]) == (1.0, 1.0, 1.0)
    count = "eval/gain/heldout/count/count"
    assert (gains[count], gains[count + "_low"], gains[count + "_high"]) == (0.0, 0.0, 0.0)
    # "all" pools the kinds per prompt: 6 of 10 prompts gained 1.
    assert gains["eval/gain/heldout/all/score"] == pytest.approx(0.6)
    assert "eval/gain/heldout/relation/relation" not in gains  # no relation prompts: no gain claimed


def test_eval_gain_refuses_other_prompts():
    from stages.eval import paired_gains

    before, after = _rows([False] * 2, []), _rows([True] * 3, [])
    with pytest.raises(ValueError, match="^eval: the previous stage's evaluation used other prompts"):
        paired_gains(before, after, images_per_prompt=2)
