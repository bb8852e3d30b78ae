"""Seed streams are frozen arithmetic: a changed formula changes every run's numbers, so pin the integers."""

from kiln import seeding


def test_streams_give_the_integers_runs_were_trained_with():
    assert [seeding.rung(3, i) for i in (0, 1, 2)] == [3000, 3001, 3002]
    assert seeding.dpo(3) == 3101
    assert seeding.grpo_prompts(2, 7) == 2 * 100003 + 7
    assert seeding.grpo_noise(2, 7, 1) == 2 * 1000003 + 7 * 1009 + 1
    assert seeding.shard_shuffle(5, 4) == 5 * 1000003 + 4
    assert seeding.synthetic_scene(0, 64, 12) == "0:64:12"
    assert seeding.eval_batch(7, 16) == 23 and seeding.eval_baseline(7) == 8
    assert seeding.grpo_probe(2) == 2 * 1000003 - 1


def test_streams_of_one_run_do_not_collide():
    seed, rungs = 0, 4
    streams = [seeding.rung(seed, i) for i in range(rungs + 1)] + [seeding.dpo(seed)]  # + 1: SFT
    assert len(set(streams)) == len(streams)
