"""evaluate.py's calibration report: Brier and Murphy's decomposition, MCE, risk–coverage (AURC, E-AURC, risk
at fixed coverage), the bootstrap over users and the paired comparison — by hand on small tables, against
brute force over every order of tied confidences, and against scikit-learn and torchmetrics on random data
(test-only dependencies, requirements-test.txt)."""
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error

import common
import evaluate
import plots

TAXONOMY = {"name": "tiny", "dimensions": {"a": {"description": "", "classes": ["x", "y", "NA"]},
                                           "b": {"description": "", "classes": ["p", "q", "NA"]}}}
# Hand table: confidence 2: one right, one wrong; confidence 8: three right, one wrong.
LEVELS, RIGHT, WRONG = [2, 8], [1, 3], [1, 1]


def P(label, confidence):
    return {"label": label, "confidence": confidence}


def level_table(conf, ok):
    """(levels, right, wrong) of predictions (confidence, correct), the way the count table holds them."""
    levels = np.unique(conf)
    index = np.searchsorted(levels, conf)
    ok = np.asarray(ok, dtype=bool)
    return levels, np.bincount(index[ok], minlength=len(levels)), np.bincount(index[~ok], minlength=len(levels))


def random_profiles(rng, n_users, continuous=False):
    dims = TAXONOMY["dimensions"]
    users = [{"user_id": f"u{i}", "labels": {d: rng.choice(spec["classes"]) for d, spec in dims.items()
                                             if rng.random() < 0.9}} for i in range(n_users)]
    profiles = {}
    for u in users:
        if rng.random() < 0.1:
            continue  # missing: abstains everywhere
        profiles[u["user_id"]] = {d: None if rng.random() < 0.1 else P(
            rng.choice(spec["classes"]), rng.uniform(0.05, 9.95) if continuous else rng.choice([None, *range(1, 11)]))
            for d, spec in dims.items()}
    return users, profiles


def scored_predictions(profiles, users):
    """(confidence, correct) of every non-abstained prediction with a confidence at τ = 0, read straight from
    the profiles (an independent path from the count table)."""
    out = []
    for u in users:
        for d in TAXONOMY["dimensions"]:
            entry, gold = (profiles.get(u["user_id"]) or {}).get(d), u["labels"].get(d)
            if gold is None or entry is None or entry["label"] == "NA" or entry["confidence"] is None:
                continue
            out.append((entry["confidence"], entry["label"] == gold))
    return out


# -----------------------------------------------------------------------------
# By hand


def test_brier_and_murphy_decomposition_by_hand():
    # (0.2−1)² + 0.2² + 3·(0.8−1)² + 0.8² = 0.64 + 0.04 + 0.12 + 0.64 = 1.44 over 6
    assert evaluate.brier_score(LEVELS, RIGHT, WRONG) == pytest.approx(0.24)
    m = evaluate.murphy_decomposition(LEVELS, RIGHT, WRONG)
    # ō = 4/6; level 0.2: ō = 1/2, level 0.8: ō = 3/4
    assert m["reliability"] == pytest.approx((2 * 0.3 ** 2 + 4 * 0.05 ** 2) / 6)  # 0.19/6
    assert m["resolution"] == pytest.approx((2 * (1 / 2 - 2 / 3) ** 2 + 4 * (3 / 4 - 2 / 3) ** 2) / 6)  # 1/72
    assert m["uncertainty"] == pytest.approx(2 / 9)
    assert m["reliability"] - m["resolution"] + m["uncertainty"] == pytest.approx(0.24, abs=1e-15)
    assert evaluate.brier_score([5], [0], [0]) is None and evaluate.murphy_decomposition([5], [0], [0]) is None


def test_murphy_identity_is_exact_with_one_bin_per_level():
    rng = np.random.default_rng(0)
    for levels in (np.arange(1, 11, dtype=float), np.sort(rng.uniform(0, 10, 300))):
        right, wrong = rng.integers(0, 50, len(levels)), rng.integers(0, 50, len(levels))
        m = evaluate.murphy_decomposition(levels, right, wrong)
        assert m["reliability"] - m["resolution"] + m["uncertainty"] == pytest.approx(
            evaluate.brier_score(levels, right, wrong), abs=1e-14)


def test_risk_coverage_aurc_and_risk_at_coverage_by_hand():
    blocks = evaluate.risk_coverage_blocks(LEVELS, RIGHT, WRONG)
    assert blocks == [{"confidence": 8.0, "coverage": pytest.approx(4 / 6), "risk": 0.25, "n": 4},
                      {"confidence": 2.0, "coverage": 1.0, "risk": pytest.approx(2 / 6), "n": 2}]
    # block 8 (1 wrong of 4): Σ_j (j/4)/j = 1; block 2 after 4 kept, 1 wrong (s = 1/2): (1.5)/5 + 2/6
    assert evaluate.aurc(LEVELS, RIGHT, WRONG) == pytest.approx((1 + 0.3 + 1 / 3) / 6)  # 49/180
    # oracle: 4 right first, then 1/5 + 2/6 over 6
    assert evaluate.oracle_aurc(4, 2) == pytest.approx((1 / 5 + 2 / 6) / 6)
    assert evaluate.excess_aurc(LEVELS, RIGHT, WRONG) == pytest.approx(49 / 180 - 16 / 180)
    # 50 %: k = 3 inside the first block: 3/4 wrong expected of 3; 80 %: k = 4.8: (1 + 0.8 · 1/2) / 4.8
    assert evaluate.risk_at_coverage(LEVELS, RIGHT, WRONG, 0.5) == pytest.approx(0.25)
    assert evaluate.risk_at_coverage(LEVELS, RIGHT, WRONG, 0.8) == pytest.approx(7 / 24)
    assert evaluate.risk_at_coverage(LEVELS, RIGHT, WRONG, 1.0) == pytest.approx(2 / 6)
    assert evaluate.aurc([3], [0], [0]) is None and evaluate.oracle_aurc(0, 0) is None
    assert evaluate.aurc([3, 7], [0, 5], [2, 0]) == pytest.approx(evaluate.oracle_aurc(5, 2))  # a perfect ordering
    # the drawn line passes through every block end and follows risk_at_coverage inside a block
    xs, ys = evaluate.risk_coverage_line(blocks, points_per_block=4)
    assert xs[3] == pytest.approx(4 / 6) and ys[3] == pytest.approx(0.25) and xs[-1] == 1.0
    assert ys[5] == pytest.approx(evaluate.risk_at_coverage(LEVELS, RIGHT, WRONG, xs[5]))


def test_mce_is_the_worst_bin_beside_ece():
    users = [{"user_id": f"u{i}", "labels": {"a": "x", "b": "p"}} for i in range(3)]
    preds = {"u0": {"a": P("x", 8), "b": P("q", 9)}, "u1": {"a": P("y", 8), "b": P("p", 3)}, "u2": {"a": P("x", 3)}}
    m = evaluate.evaluate(preds, users, TAXONOMY)
    # bins: 0.8: 1 of 2 right (gap 0.3), 0.9: 0 of 1 (gap 0.9), 0.3: 2 of 2 (gap 0.7)
    assert m["mce"] == pytest.approx(0.9)
    assert m["ece"] == pytest.approx((2 * 0.3 + 0.9 + 2 * 0.7) / 5)
    assert [r["n"] for r in m["reliability"]] == [0, 0, 2, 0, 0, 0, 0, 2, 1, 0]
    assert evaluate.max_calibration_error(evaluate.reliability_from_levels([], [], [])) is None


def test_harmonic_numbers():
    for n in (0, 1, 2, 10, 63, 64, 65, 500, 12345, 10 ** 6):
        exact = math.fsum(1 / i for i in range(1, n + 1))
        assert float(evaluate.harmonic(n)) == pytest.approx(exact, rel=1e-14, abs=0)
    assert evaluate.harmonic([3, 100]).tolist() == pytest.approx([1 + 1 / 2 + 1 / 3, 5.187377517639621], rel=1e-14)


def test_percentile_interval_by_hand():
    assert evaluate.percentile_interval(np.arange(101), 0.9) == pytest.approx((5.0, 95.0))
    assert evaluate.percentile_interval([np.nan, 1.0, 3.0], 0.5) == pytest.approx((1.5, 2.5))  # undefined replicates left out
    assert evaluate.percentile_interval([np.nan], 0.95) == (None, None)


# -----------------------------------------------------------------------------
# Brute force: ties in confidence are one block, in random order


def test_aurc_and_risk_at_coverage_are_the_mean_over_every_order_of_tied_confidences():
    rng = random.Random(3)
    for _ in range(25):
        n = rng.randint(1, 7)
        conf = [rng.choice([2, 5, 5.5, 9]) for _ in range(n)]
        ok = [rng.random() < 0.6 for _ in range(n)]
        # every order that sorts by confidence, highest first (all permutations of each tied block)
        blocks = [[o for c2, o in zip(conf, ok) if c2 == c] for c in sorted(set(conf), reverse=True)]
        orders = [sum(map(list, combo), []) for combo in itertools.product(*(itertools.permutations(b) for b in blocks))]

        def risk(order, k):
            return sum(not o for o in order[:k]) / k

        expected_aurc = sum(sum(risk(o, k) for k in range(1, n + 1)) / n for o in orders) / len(orders)
        assert evaluate.aurc(*level_table(conf, ok)) == pytest.approx(expected_aurc, abs=1e-12)
        for k in range(1, n + 1):
            expected = sum(risk(o, k) for o in orders) / len(orders)
            assert evaluate.risk_at_coverage(*level_table(conf, ok), k / n) == pytest.approx(expected, abs=1e-12)
        oracle = sorted(ok, reverse=True)  # right first
        assert evaluate.oracle_aurc(sum(ok), n - sum(ok)) == pytest.approx(
            sum(risk(oracle, k) for k in range(1, n + 1)) / n, abs=1e-12)


def test_aurc_without_ties_is_the_mean_risk_over_the_sorted_predictions():
    rng = np.random.default_rng(4)
    conf = rng.uniform(0, 10, 2000)
    ok = rng.random(2000) < conf / 12
    order = ok[np.argsort(-conf)]
    risk = np.cumsum(~order) / np.arange(1, 2001)
    assert evaluate.aurc(*level_table(conf, ok)) == pytest.approx(risk.mean(), abs=1e-12)
    assert evaluate.risk_at_coverage(*level_table(conf, ok), 0.5) == pytest.approx(risk[999], abs=1e-12)
    assert evaluate.risk_at_coverage(*level_table(conf, ok), 0.8) == pytest.approx(risk[1599], abs=1e-12)


# -----------------------------------------------------------------------------
# Oracles: scikit-learn and torchmetrics on random data (test-only dependencies)


@pytest.mark.parametrize("continuous", [False, True])
def test_metrics_against_scikit_learn(continuous):
    users, profiles = random_profiles(random.Random(5 + continuous), 400, continuous)
    m = evaluate.evaluate(profiles, users, TAXONOMY)
    conf, ok = map(np.array, zip(*scored_predictions(profiles, users)))
    assert m["brier"] == pytest.approx(brier_score_loss(ok, conf / 10), abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(ok, conf), abs=1e-12)  # ties ½ in both
    # calibration_curve's uniform bins are (b/10, (b+1)/10] as ours: the same non-empty bins
    prob_true, prob_pred = calibration_curve(ok, conf / 10, n_bins=10, strategy="uniform")
    rows = [r for r in m["reliability"] if r["n"]]
    assert [r["accuracy"] for r in rows] == pytest.approx(prob_true.tolist(), abs=1e-12)
    assert [r["mean_confidence"] for r in rows] == pytest.approx(prob_pred.tolist(), abs=1e-12)
    # per dimension too
    for d in TAXONOMY["dimensions"]:
        sub = scored_predictions({u: {d: (p or {}).get(d)} for u, p in profiles.items()}, users)
        c_d, ok_d = map(np.array, zip(*sub))
        cal = m["per_dimension"][d]["calibration"]
        assert cal["brier"] == pytest.approx(brier_score_loss(ok_d, c_d / 10), abs=1e-12)
        assert cal["auroc"] == pytest.approx(roc_auc_score(ok_d, c_d), abs=1e-12)


def test_ece_and_mce_against_torchmetrics():
    """torchmetrics bins are [b/10, (b+1)/10) (1.0 in the last); ours (b/10, (b+1)/10]. On confidences that
    fall on no bin edge the two agree exactly; on the stated levels 1..10 torchmetrics puts 0.9 and 1.0 in
    one bin where we keep each level in its own (docs/design.md, "Evaluation")."""
    users, profiles = random_profiles(random.Random(6), 500, continuous=True)
    m = evaluate.evaluate(profiles, users, TAXONOMY)
    conf, ok = map(np.array, zip(*scored_predictions(profiles, users)))
    preds, target = torch.tensor(conf / 10, dtype=torch.float64), torch.tensor(ok, dtype=torch.long)
    assert m["ece"] == pytest.approx(binary_calibration_error(preds, target, n_bins=10, norm="l1").item(), abs=1e-9)
    assert m["mce"] == pytest.approx(binary_calibration_error(preds, target, n_bins=10, norm="max").item(), abs=1e-9)


def test_fast_path_against_the_one_by_one_oracles():
    rng = random.Random(7)
    conf = [rng.choice([0, 1, 2.5, 3, 7, 9.99, 10]) for _ in range(300)]
    ok = [rng.random() < 0.5 for _ in conf]
    levels = level_table(np.array(conf, dtype=float), ok)
    for fast, slow in zip(evaluate.reliability_from_levels(*levels), evaluate.reliability_table(conf, ok)):
        assert fast["bin"] == slow["bin"] and fast["n"] == slow["n"]
        for key in ("mean_confidence", "accuracy"):
            assert fast[key] == (None if slow[key] is None else pytest.approx(slow[key], abs=1e-12))
    assert evaluate.calibration_error(evaluate.reliability_from_levels(*levels)) == pytest.approx(
        evaluate.expected_calibration_error(conf, ok), abs=1e-12)
    assert evaluate.auroc_from_levels(*levels) == pytest.approx(evaluate.auroc(conf, ok), abs=1e-12)


# -----------------------------------------------------------------------------
# The count table and the bootstrap over users


def table_of(profiles, users):
    table, row_of = evaluate.gold_table(users, TAXONOMY)
    for uid, row in row_of.items():
        if uid in profiles:
            evaluate.set_prediction(table, row, uid, profiles[uid], TAXONOMY)
    return table


def test_headline_from_the_count_table_equals_the_metrics():
    users, profiles = random_profiles(random.Random(8), 300)
    m = evaluate.evaluate(profiles, users, TAXONOMY)
    uc = evaluate.cell_codes(table_of(profiles, users))
    h = evaluate.headline_metrics(evaluate.count_table(uc), uc.levels)
    assert h[-1].tolist() == pytest.approx([m["avg_f1"], m["ece"], m["brier"], m["auroc"], m["aurc"]], abs=1e-12)
    for j, d in enumerate(TAXONOMY["dimensions"]):
        c = m["per_dimension"][d]["calibration"]
        assert h[j].tolist() == pytest.approx([m["per_dimension"][d]["f1"], c["ece"], c["brier"], c["auroc"], c["aurc"]],
                                              abs=1e-12)


def test_a_bootstrap_replicate_equals_evaluating_the_resampled_users():
    """Weighting each user's counts by how often it was drawn is the same as evaluating the drawn users."""
    users, profiles = random_profiles(random.Random(9), 120)
    uc = evaluate.cell_codes(table_of(profiles, users))
    w = evaluate.bootstrap_weights(np.random.default_rng(11), len(users))
    drawn_users, drawn_profiles = [], {}
    for u, times in zip(users, w.astype(int).tolist()):
        for t in range(times):
            uid = f"{u['user_id']}#{t}"
            drawn_users.append({**u, "user_id": uid})
            if u["user_id"] in profiles:
                drawn_profiles[uid] = profiles[u["user_id"]]
    m = evaluate.evaluate(drawn_profiles, drawn_users, TAXONOMY)
    h = evaluate.headline_metrics(evaluate.count_table(uc, w), uc.levels)
    assert h[-1].tolist() == pytest.approx([m["avg_f1"], m["ece"], m["brier"], m["auroc"], m["aurc"]], abs=1e-12)


def test_bootstrap_is_seeded_and_paired():
    users, profiles = random_profiles(random.Random(10), 150)
    _, other = random_profiles(random.Random(12), 150)
    ucs = [evaluate.cell_codes(table_of(p, users)) for p in (profiles, other)]
    a = evaluate.bootstrap_headline(ucs, replicates=40, seed=3)
    b = evaluate.bootstrap_headline(ucs, replicates=40, seed=3)
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))
    assert not np.array_equal(a[0], evaluate.bootstrap_headline(ucs, replicates=40, seed=4)[0], equal_nan=True)
    est = [evaluate.headline_metrics(evaluate.count_table(uc), uc.levels) for uc in ucs]
    dims = list(TAXONOMY["dimensions"])
    diff = evaluate.paired_differences(est, a, dims)[0]
    assert diff["pooled"]["f1"]["delta"] == pytest.approx(est[1][-1, 0] - est[0][-1, 0])
    lo, hi = np.percentile(a[1][:, -1, 2] - a[0][:, -1, 2], [2.5, 97.5])  # paired: the same draws for both
    assert (diff["pooled"]["brier"]["low"], diff["pooled"]["brier"]["high"]) == pytest.approx((lo, hi))
    same = evaluate.paired_differences([est[0], est[0]], [a[0], a[0]], dims)[0]
    assert all(r == {"delta": 0.0, "low": 0.0, "high": 0.0} for r in same["pooled"].values())


# -----------------------------------------------------------------------------
# The command lines: report, figure, comparison


@pytest.fixture
def files(tmp_path):
    users, profiles = random_profiles(random.Random(13), 200)
    _, other = random_profiles(random.Random(14), 200)
    other = {uid: other.get(uid) for uid in profiles}  # the same users as the first file
    (tmp_path / "tax.json").write_text(json.dumps(TAXONOMY))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(u) + "\n" for u in users))
    for name, p in (("a", profiles), ("b", other)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text(
            "".join(json.dumps({"user_id": uid, "profile": pr}) + "\n" for uid, pr in p.items()))
    return tmp_path, users, profiles, other


def test_cli_writes_the_calibration_report_intervals_and_figure(files):
    tmp, users, profiles, _ = files
    out = tmp / "eval"
    argv = ["--predictions", str(tmp / "a" / "predictions.jsonl"), "--data", str(tmp / "data.jsonl"), "--out", str(out),
            "--taxonomy", str(tmp / "tax.json"), "--bootstrap", "60", "--seed", "5"]
    m = evaluate.main(argv)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["intervals"]["replicates"] == 60 and saved["intervals"]["seed"] == 5
    assert set(saved["intervals"]["per_dimension"]) == {"a", "b"}
    assert saved["calibration"]["risk_at_coverage"].keys() == {"50%", "80%"} and saved["calibration"]["e_aurc"] >= 0
    assert saved["per_dimension"]["a"]["calibration"]["murphy"]["uncertainty"] > 0
    report = (out / "report.md").read_text()
    assert "## Confidence as a probability of being right" in report and "## 95% intervals" in report
    assert "![risk against coverage" in report and (out / "risk_coverage.png").read_bytes().startswith(b"\x89PNG")
    assert f"| all dimensions | {evaluate._with_interval(saved['intervals']['pooled']['f1'])} |" in report
    assert evaluate.main(argv)["intervals"] == m["intervals"]  # seeded: the same intervals again


def test_risk_coverage_figure_draws_each_group_and_the_oracle(files):
    tmp, users, profiles, _ = files
    m = evaluate.evaluate(profiles, users, TAXONOMY)
    blocks = {"all": m["calibration"]["risk_coverage"], "a": m["per_dimension"]["a"]["calibration"]["risk_coverage"]}
    lines = {k: evaluate.risk_coverage_line(b) for k, b in blocks.items()}
    fig = plots.risk_coverage_figure(lines, blocks, oracle=([0.5, 1.0], [0.0, 0.2]))
    ax = fig.axes[0]
    assert len(ax.lines) == 5  # two curves, their block-end markers, the oracle
    assert len(ax.lines[1].get_xdata()) == len(blocks["all"]) == 10  # one marker per confidence level


def test_compare_gives_paired_differences_and_refuses_other_users(files, capsys):
    tmp, users, profiles, other = files
    a, b = str(tmp / "a" / "predictions.jsonl"), str(tmp / "b" / "predictions.jsonl")
    common_args = ["--data", str(tmp / "data.jsonl"), "--taxonomy", str(tmp / "tax.json"), "--bootstrap", "50"]
    doc = evaluate.main(["compare", a, b, "--out", str(tmp / "cmp"), *common_args])
    assert [f["name"] for f in doc["files"]] == ["a", "b"] and doc["reference"] == "a"
    ma, mb = evaluate.evaluate(profiles, users, TAXONOMY), evaluate.evaluate(other, users, TAXONOMY)
    d = doc["differences"][0]["pooled"]
    assert d["f1"]["delta"] == pytest.approx(mb["avg_f1"] - ma["avg_f1"], abs=1e-12)
    assert d["aurc"]["delta"] == pytest.approx(mb["aurc"] - ma["aurc"], abs=1e-12)
    assert d["brier"]["low"] <= d["brier"]["delta"] <= d["brier"]["high"]
    assert json.loads((tmp / "cmp" / "comparison.json").read_text()) == json.loads(json.dumps(doc))
    md = (tmp / "cmp" / "comparison.md").read_text()
    assert "## Paired differences against a" in md and "### b − a, per dimension" in md
    assert "b − a: Δ avg F1 " in capsys.readouterr().out
    # a file over other users: one line, exit status 1
    lines = (tmp / "b" / "predictions.jsonl").read_text().splitlines()
    (tmp / "c.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(SystemExit) as e:
        common.run_cli(evaluate.main, "evaluate.py", ["compare", a, str(tmp / "c.jsonl"), "--out", str(tmp / "x"),
                                                      *common_args])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert "are not on the same users" in e.value.code and "1 users differ" in e.value.code
    with pytest.raises(SystemExit) as e:
        common.run_cli(evaluate.main, "evaluate.py", ["compare", a, "--out", str(tmp / "x"), *common_args])
    assert "expected two or more predictions files, got 1" in e.value.code


def test_pipeline_tables_carry_the_intervals_and_the_paired_delta(files):
    import pipeline  # the results tables of the demo (pipeline.py's results part only)
    tmp, users, profiles, other = files
    common_args = ["--data", str(tmp / "data.jsonl"), "--taxonomy", str(tmp / "tax.json"), "--bootstrap", "50"]
    m = evaluate.main(["--predictions", str(tmp / "a" / "predictions.jsonl"), "--out", str(tmp / "ev"), *common_args])
    f1 = m["intervals"]["pooled"]["f1"]
    table = pipeline.results_table([("row", m)], TAXONOMY)
    assert f"**{100 * m['avg_f1']:.2f}** [{100 * f1['low']:.2f}, {100 * f1['high']:.2f}]" in table
    cal = pipeline.calibration_table([("row", m)])
    assert f"| row | {m['calibration']['n']} | {m['brier']:.3f} [" in cal
    doc = evaluate.main(["compare", str(tmp / "a" / "predictions.jsonl"), str(tmp / "b" / "predictions.jsonl"),
                         "--out", str(tmp / "cmp"), *common_args])
    d = doc["differences"][0]["pooled"]["f1"]
    paired = pipeline.paired_table(doc, {"a": "SFT", "b": "SFT + RL"})
    assert f"| SFT + RL − SFT | {100 * d['delta']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] |" in paired
