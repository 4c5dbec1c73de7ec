"""study.py's interval over seeds and users, on hand-made seeds whose F1 is known (the end-to-end smoke
run of `study.py --quick` is in test_demo.py, on the quick demo's seed)."""
import numpy as np
import pytest

import evaluate
import study

TAXONOMY = {"name": "tiny", "dimensions": {"a": {"description": "", "classes": ["x", "y", "NA"]}}}


def counts(predicted):
    """UserCounts of users whose gold is x, predicting `predicted` (one label each, confidence 5)."""
    users = [{"user_id": f"u{i}", "labels": {"a": "x"}} for i in range(len(predicted))]
    table, row_of = evaluate.gold_table(users, TAXONOMY)
    for i, label in enumerate(predicted):
        evaluate.set_prediction(table, i, f"u{i}", {"a": {"label": label, "confidence": 5}}, TAXONOMY)
    return evaluate.cell_codes(table)


def test_two_level_bootstrap_draws_seeds_then_users():
    """Row A is right everywhere (F1 1); row B is right on every user of seed 0 (F1 1) and wrong on every user
    of seed 1 (F1 0). Users are alike within a seed, so a replicate's B is the mean over the drawn seeds:
    1 (seeds 0, 0), 0.5 (one each) or 0 (1, 1), with chances 1/4, 1/2, 1/4; A is 1 in each."""
    right, wrong = counts(["x"] * 4), counts(["y"] * 4)
    estimate, boot = study.two_level_bootstrap([[right, right], [right, wrong]], replicates=4000, seed=0)
    assert estimate.tolist() == [1.0, 0.5]
    assert set(boot[:, 0].tolist()) == {1.0} and set(boot[:, 1].tolist()) == {0.0, 0.5, 1.0}
    shares = [np.mean(boot[:, 1] == v) for v in (0.0, 0.5, 1.0)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    delta = boot[:, 1] - boot[:, 0]
    assert evaluate.percentile_interval(delta) == (-1.0, 0.0)
    assert study.reading(*evaluate.percentile_interval(delta)) == "no difference measured"


def test_two_level_bootstrap_draws_users_within_a_seed():
    """One seed, row B right on 2 of 4 users: P = R = 1/2, F1 0.5; drawing users moves it (1 right of 4
    drawn: 0.25 ... all 4 right: 1); row A, right on all, stays 1, so Δ lies in [-1, 0] and is paired."""
    estimate, boot = study.two_level_bootstrap([[counts(["x"] * 4), counts(["x", "x", "y", "y"])]], 2000, seed=1)
    assert estimate.tolist() == [1.0, 0.5]
    assert set(boot[:, 1].tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0} and len(set(boot[:, 1].tolist())) >= 4
    low, high = evaluate.percentile_interval(boot[:, 1] - boot[:, 0])
    assert -1.0 <= low < -0.5 and -0.5 < high <= 0.0


def test_reading_says_a_difference_only_when_its_interval_leaves_zero_out():
    assert study.reading(-0.02, 0.01) == "no difference measured"
    assert study.reading(0.0, 0.03) == "no difference measured"
    assert study.reading(0.004, 0.03) == "higher than the full method"
    assert study.reading(-0.05, -0.01) == "lower than the full method"
    assert study.reading(None, None) == "no difference measured"


def test_seeds_must_be_distinct_integers():
    with pytest.raises(study.ConfigError, match="seeds: expected comma-separated integers"):
        study.StudyConfig(seeds="0,one")
    with pytest.raises(study.ConfigError, match="seeds: expected distinct integers"):
        study.StudyConfig(seeds="1,1")


def test_variants_pick_the_rows_and_unknown_keys_are_refused():
    rows = study.StudyConfig(variants="rl_no_weighting, sft_continued,rl_no_filter").rows()
    assert [key for key, _, _ in rows] == ["student_sft", "student_rl", "rl_no_filter", "rl_no_weighting",
                                           "sft_continued"]
    assert [run for _, _, run in rows] == [None, "rl", "ablations/rl_no_filter/rl", "ablations/rl_no_weighting/rl", None]
    assert len(study.StudyConfig().rows()) == len(study.ROWS) == 18
    with pytest.raises(study.ConfigError, match="variants: unknown 'rl_nofilter'; expected keys among sft_single"):
        study.StudyConfig(variants="rl_nofilter")
