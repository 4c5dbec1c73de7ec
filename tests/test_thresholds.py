"""Thresholds for deployment (evaluate.py) and the predict command (predict.py): the Wilson bound and the
choice of τ against numbers computed by hand, ties in confidence, unreachable targets, the label-free
rule, thresholds applied exactly, and predict.py's batching, resume and guards."""
import json
import shutil

import pytest

import common
import evaluate
import predict
import profilebench
import label
import rollout
from confprofile import load_taxonomy

Z95 = 1.6448536269514715  # Φ⁻¹(0.95): a one-sided 95 % bound

# One dimension, 40 users, every one labelled with a class. Predictions at three confidence levels:
# 10 at c = 9 all correct, 10 at c = 7 (5 correct), 10 at c = 3 (2 correct), 10 NA.
#   τ = 1..3: kept 30, correct 17 (P 0.567);  τ = 4..7: kept 20, correct 15 (P 0.75);
#   τ = 8..9: kept 10, correct 10 (P 1);      τ = 10: nothing kept.
TAX = {"name": "one", "dimensions": {"a": {"description": "", "classes": ["x", "y", "NA"]}}}
USERS = [{"user_id": f"u{i:02d}", "labels": {"a": "x"}} for i in range(40)]
LEVELS = [(9, 10, 10), (7, 10, 5), (3, 10, 2)]  # (confidence, predictions, correct)


def level_predictions():
    preds, i = {}, 0
    for confidence, n, n_ok in LEVELS:
        for k in range(n):
            preds[f"u{i:02d}"] = {"a": {"label": "x" if k < n_ok else "y", "confidence": confidence}}
            i += 1
    for _ in range(10):
        preds[f"u{i:02d}"] = {"a": {"label": "NA", "confidence": 8}}
        i += 1
    return preds


@pytest.fixture(scope="module")
def curve():
    return evaluate.evaluate(level_predictions(), USERS, TAX)["curves"]["a"]


# Wilson lower bounds by hand, L = (p + z²/2n − z√(p(1−p)/n + z²/4n²)) / (1 + z²/n), z² = 2.705543:
L_10_OF_10 = 10 / (10 + Z95 ** 2)  # p = 1: the square root is z/2n, so L = n / (n + z²) = 0.787058
L_15_OF_20 = 0.56780  # p 0.75: (0.75 + 0.067639 − 0.173030) / 1.135277
L_17_OF_30 = 0.41852  # p 0.5667: (0.566667 + 0.045092 − 0.155495) / 1.090185


def test_wilson_lower_bound_by_hand():
    # the classic two-sided 95 % case, z = 1.96: 9 of 10 -> 0.5958
    assert evaluate.wilson_lower_bound(9, 10, 1.96) == pytest.approx(0.59584, abs=1e-5)
    assert evaluate.one_sided_z(0.95) == pytest.approx(Z95)
    assert evaluate.wilson_lower_bound(10, 10, Z95) == pytest.approx(0.787058, abs=1e-6)
    assert evaluate.wilson_lower_bound(15, 20, Z95) == pytest.approx(L_15_OF_20, abs=1e-5)
    assert evaluate.wilson_lower_bound(17, 30, Z95) == pytest.approx(L_17_OF_30, abs=1e-5)
    assert evaluate.wilson_lower_bound(3, 3, Z95) == pytest.approx(3 / (3 + Z95 ** 2))  # 0.526: 3 of 3 is not 1
    assert evaluate.wilson_lower_bound(0, 5, Z95) == 0.0 and evaluate.wilson_lower_bound(0, 0, Z95) is None


def test_ties_in_confidence_stand_or_fall_together(curve):
    """τ moves in whole confidence levels: the 10 predictions at c = 7 are all kept at τ = 7 and all dropped
    at τ = 8, never a part of them."""
    kept = {r["tau"]: (r["n_predicted"], r["n_correct"]) for r in curve}
    assert kept == {0: (30, 17), 1: (30, 17), 2: (30, 17), 3: (30, 17), 4: (20, 15), 5: (20, 15), 6: (20, 15),
                    7: (20, 15), 8: (10, 10), 9: (10, 10), 10: (0, 0)}


@pytest.mark.parametrize("target, tau, precision, lower", [
    (0.40, 1, 17 / 30, L_17_OF_30),   # already at τ = 1
    (0.45, 4, 0.75, L_15_OF_20),      # τ = 1..3 bound 0.4185 < 0.45: the next level
    (0.56, 4, 0.75, L_15_OF_20),
    (0.57, 8, 1.0, L_10_OF_10),       # 0.5678 < 0.57: precision 0.75 would pass a point estimate, not the bound
    (0.78, 8, 1.0, L_10_OF_10),       # τ = 8 and 9 tie: the smallest, more recall
])
def test_choose_threshold_smallest_tau_whose_bound_reaches_the_target(curve, target, tau, precision, lower):
    r = evaluate.choose_threshold(curve, target, 0.95, "none")
    assert r["tau"] == tau and r["claimed"] is True and r["target"] == target
    assert r["precision"] == pytest.approx(precision) and r["precision_lower"] == pytest.approx(lower, abs=1e-5)
    assert r["recall"] == pytest.approx({1: 17, 4: 15, 8: 10}[tau] / 40) and r["recall_no_threshold"] == pytest.approx(17 / 40)
    assert r["n_kept"] == {1: 30, 4: 20, 8: 10}[tau]


def test_unreachable_target_reports_the_best_tau(curve):
    """0.80 > every bound (the best is 10 of 10: 0.787): no τ is claimed; the best bound is reported, at the
    smaller of the two tied levels (8 and 9), with its precision and recall."""
    r = evaluate.choose_threshold(curve, 0.80, 0.95, "none")
    assert r["tau"] is None and r["claimed"] is False and r["best_tau"] == 8
    assert r["precision"] == 1.0 and r["precision_lower"] == pytest.approx(L_10_OF_10)
    assert r["recall"] == pytest.approx(10 / 40) and r["n_kept"] == 10
    # a dimension where nothing is ever kept (all NA): no best τ either
    all_na = {u["user_id"]: {"a": {"label": "NA", "confidence": 9}} for u in USERS}
    nothing = evaluate.choose_threshold(evaluate.evaluate(all_na, USERS, TAX)["curves"]["a"], 0.5)
    assert nothing["tau"] is None and nothing["best_tau"] is None and nothing["n_kept"] == 0
    assert nothing["precision"] is None and nothing["recall_no_threshold"] == 0.0 and nothing["levels_searched"] == 0


# The same curve at the Bonferroni z over its m = 3 distinct kept sets (τ 1..3, 4..7, 8..9; τ = 10 keeps
# nothing): z = Φ⁻¹(1 − 0.05/3) = Φ⁻¹(0.983333) = 2.128045, z² = 4.528577.
Z_B3 = 2.128045234
L3_10_OF_10 = 10 / (10 + Z_B3 ** 2)  # n / (n + z²) = 10 / 14.528577 = 0.688299
L3_15_OF_20 = 0.51215  # (0.75 + 0.113214 − 2.128045·√(0.009375 + 0.002830)) / 1.226429 = 0.628110 / 1.226429
L3_17_OF_30 = 0.37825  # (0.566667 + 0.075476 − 2.128045·√(0.008185 + 0.001258)) / 1.150953 = 0.435349 / 1.150953


def test_bonferroni_z_and_levels_searched_by_hand(curve):
    assert evaluate.bonferroni_z(0.95, 1) == pytest.approx(Z95)
    assert evaluate.bonferroni_z(0.95, 3) == pytest.approx(Z_B3)
    assert evaluate.bonferroni_z(0.95, 10) == pytest.approx(2.575829, abs=1e-6)  # Φ⁻¹(0.995)
    assert evaluate.levels_searched(curve) == 3  # ten levels, three distinct kept sets
    assert evaluate.wilson_lower_bound(15, 20, Z_B3) == pytest.approx(L3_15_OF_20, abs=1e-5)
    assert evaluate.wilson_lower_bound(17, 30, Z_B3) == pytest.approx(L3_17_OF_30, abs=1e-5)


@pytest.mark.parametrize("target, tau, lower, uncorrected_tau", [
    (0.37, 1, L3_17_OF_30, 1),
    (0.45, 4, L3_15_OF_20, 4),       # τ = 1..3: 0.378 < 0.45
    (0.52, 8, L3_10_OF_10, 4),       # τ = 4..7: 0.512 < 0.52 corrected, 0.568 per level: the correction moves τ
    (0.70, None, L3_10_OF_10, 8),    # 10 of 10 gives 0.688 < 0.70: unreachable (best τ 8), though 0.787 per level
])
def test_choose_threshold_bonferroni_by_default(curve, target, tau, lower, uncorrected_tau):
    r = evaluate.choose_threshold(curve, target)
    assert (r["tau"], r["claimed"], r["levels_searched"]) == (tau, tau is not None, 3)
    assert r["z"] == pytest.approx(Z_B3) and r["precision_lower"] == pytest.approx(lower, abs=1e-5)
    if tau is None:
        assert r["best_tau"] == 8 and r["n_kept"] == 10
    assert evaluate.choose_threshold(curve, target, 0.95, "none")["tau"] == uncorrected_tau


def kept_of(confidences):
    """{τ: kept_τ} of one dimension whose non-NA answers state these confidences (count_kept, one at a time)."""
    kept = {"a": dict.fromkeys(evaluate.TAUS, 0)}
    for c in confidences:
        evaluate.count_kept(kept, {"a": {"label": "x", "confidence": c}})
    return kept["a"]


def test_coverage_threshold_by_hand():
    """Label-free: the smallest τ keeping at most the share; 40 users, non-NA answers at 9 (10), 7 (10), 3 (10)."""
    confidences = [9] * 10 + [7] * 10 + [3] * 10
    expected = {0.8: (1, 0.75), 0.5: (4, 0.5), 0.3: (8, 0.25), 0.2: (10, 0.0)}
    for coverage, (tau, share) in expected.items():
        r = evaluate.coverage_threshold(kept_of(confidences), 40, coverage)
        assert (r["tau"], r["coverage"], r["precision"]) == (tau, share, None)
    # every answer at 10: no level keeps half; the strictest level is the answer
    assert evaluate.coverage_threshold(kept_of([10] * 10), 10, 0.5)["tau"] == 10
    # an answer without a confidence is kept at no τ >= 1
    assert evaluate.coverage_threshold(kept_of([None, 5]), 2, 0.5)["tau"] == 1
    # counted one profile at a time (count_kept, as evaluate.py reads a file): the same counts; NA and
    # missing answers are not kept
    kept = {"a": dict.fromkeys(evaluate.TAUS, 0)}
    for c in confidences + [None]:
        evaluate.count_kept(kept, {"a": {"label": "x", "confidence": c}})
    evaluate.count_kept(kept, {"a": {"label": "NA", "confidence": 10}})
    evaluate.count_kept(kept, None)
    assert kept["a"] == {1: 30, 2: 30, 3: 30, 4: 20, 5: 20, 6: 20, 7: 20, 8: 10, 9: 10, 10: 0}


def test_thresholds_applied_recall_cost(curve):
    r = evaluate.thresholds_applied({"a": curve}, {"a": 8})["a"]
    assert (r["precision"], r["n_kept"]) == (1.0, 10)
    assert r["recall_cost"] == pytest.approx(17 / 40 - 10 / 40)
    off = evaluate.thresholds_applied({"a": curve}, {"a": None})["a"]  # unreachable: abstains everywhere
    assert off["precision"] is None and off["recall"] == 0.0 and off["recall_cost"] == pytest.approx(17 / 40)


# -----------------------------------------------------------------------------
# evaluate.py's command line: thresholds.json, --thresholds, the label-free mode


@pytest.fixture
def files(tmp_path):
    tax, data, preds = tmp_path / "tax.json", tmp_path / "dev.jsonl", tmp_path / "preds.jsonl"
    tax.write_text(json.dumps(TAX))
    data.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    preds.write_text("".join(json.dumps({"user_id": k, "profile": v}) + "\n" for k, v in level_predictions().items()))
    return tmp_path, str(tax), str(data), str(preds)


def test_cli_writes_thresholds_json_and_applies_it(files):
    d, tax, data, preds = files
    m = evaluate.main(["--predictions", preds, "--data", data, "--out", str(d / "dev"), "--taxonomy", tax,
                       "--target-precision", "0.5"])
    doc = json.loads((d / "dev" / "thresholds.json").read_text())
    assert doc["method"] == "wilson_lower_bound" and doc["bound_level"] == 0.95 and doc["correction"] == "bonferroni"
    a = doc["dimensions"]["a"]
    assert (a["tau"], a["claimed"], a["target"], a["n_kept"], a["levels_searched"]) == (4, True, 0.5, 20, 3)
    assert a["precision_lower"] == pytest.approx(L3_15_OF_20, abs=1e-5) and m["thresholds"] == doc
    assert a["z"] == pytest.approx(Z_B3)
    report = (d / "dev" / "report.md").read_text()
    assert "## Thresholds chosen" in report and "| a | 0.50 | 4 | 0.750 | 0.512 | 0.375 | 0.425 | 20 | 3 | 2.128 |" in report
    # per level only (--bound-correction none): the uncorrected bound, 0.568
    evaluate.main(["--predictions", preds, "--data", data, "--out", str(d / "dev1"), "--taxonomy", tax,
                   "--target-precision", "0.52", "--bound-correction", "none"])
    a = json.loads((d / "dev1" / "thresholds.json").read_text())["dimensions"]["a"]
    assert (a["tau"], a["z"]) == (4, pytest.approx(Z95)) and a["precision_lower"] == pytest.approx(L_15_OF_20, abs=1e-5)
    # per-dimension targets win over the global one; an unreachable one is written as such
    evaluate.main(["--predictions", preds, "--data", data, "--out", str(d / "dev2"), "--taxonomy", tax,
                   "--dimension-targets", '{"a": 0.9}'])
    a = json.loads((d / "dev2" / "thresholds.json").read_text())["dimensions"]["a"]
    assert (a["tau"], a["claimed"], a["best_tau"], a["target"]) == (None, False, 8, 0.9)
    # applying them: precision, recall and recall cost at each τ
    m = evaluate.main(["--predictions", preds, "--data", data, "--out", str(d / "test"), "--taxonomy", tax,
                       "--thresholds", str(d / "dev" / "thresholds.json")])
    at = m["at_thresholds"]["dimensions"]["a"]
    assert (at["tau"], at["claimed"], at["precision"], at["n_kept"]) == (4, True, 0.75, 20)
    assert at["recall_cost"] == pytest.approx(2 / 40)
    assert json.loads((d / "test" / "metrics.json").read_text())["at_thresholds"]["dimensions"]["a"]["tau"] == 4
    assert "## At the thresholds of" in (d / "test" / "report.md").read_text()


def test_profile_lines_that_say_their_answer_did_not_parse_count_as_format_failures(files):
    d, tax, data, preds = files
    lines = [json.loads(x) for x in open(preds, encoding="utf-8")]
    for x in lines[:3]:
        x["format_ok"] = False
    lines[3]["format_ok"] = True
    common.write_jsonl(preds, lines)
    m = evaluate.main(["--predictions", preds, "--data", data, "--out", str(d / "f"), "--taxonomy", tax])
    assert m["format_failure_rate"] == pytest.approx(3 / 40)


def test_cli_label_free_thresholds_say_precision_is_unknown(files):
    d, tax, _, preds = files
    doc = evaluate.main(["--predictions", preds, "--out", str(d / "free"), "--taxonomy", tax, "--target-coverage", "0.3"])
    a = doc["dimensions"]["a"]
    assert (a["tau"], a["coverage"], a["n_users"], a["precision"]) == (8, 0.25, 40, None)
    assert "precision unknown" in doc["note"] and json.loads((d / "free" / "thresholds.json").read_text()) == doc
    assert not (d / "free" / "metrics.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--target-coverage", "0.3", "--target-precision", "0.9"], "not both"),
    (["--dimension-targets", '{"b": 0.9}'], r"dimension_targets: 'b' is not a dimension"),
    (["--dimension-targets", '{"a": 1.5}'], r"dimension_targets\.a: expected a precision in \(0, 1\]"),
    (["--target-precision", "1.2"], r"target_precision: expected >= 0 and <= 1"),
    (["--bound-level", "0.3"], r"bound_level: expected > 0.5"),
    (["--bound-correction", "holm"], r"bound_correction: expected one of"),
])
def test_cli_threshold_options_are_checked(files, extra, message):
    d, tax, data, preds = files
    with pytest.raises(ValueError, match=message):
        evaluate.main(["--predictions", preds, "--data", data, "--out", str(d / "x"), "--taxonomy", tax, *extra])
    with pytest.raises(ValueError, match=r"--data: expected the labelled users"):
        evaluate.main(["--predictions", preds, "--out", str(d / "x"), "--taxonomy", tax, "--target-precision", "0.9"])


@pytest.mark.parametrize("doc, message", [
    ({"dimensions": {}}, r"dimensions\.a: missing"),
    ({"dimensions": {"a": {"tau": 11}}}, r"dimensions\.a\.tau: expected an integer 0\.\.10 or null, got 11"),
    ({"dimensions": {"a": {"tau": True}}}, r"dimensions\.a\.tau: expected an integer"),
    ({"dimensions": {"a": {"tau": 3}, "zz": {"tau": 3}}}, r"dimensions: \['zz'\] not in the taxonomy"),
    ([1], r"dimensions: expected an object"),
])
def test_read_thresholds_names_the_field(tmp_path, doc, message):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(common.DataError, match=r"thresholds\.json: " + message):
        evaluate.read_thresholds(str(path), TAX)


# -----------------------------------------------------------------------------
# predict.py


def E(label, confidence, evidence="e"):
    return {"label": label, "confidence": confidence, "evidence": evidence}


def test_deployed_profile_applies_each_threshold_exactly():
    tax = {"dimensions": {d: {"classes": ["x", "y", "NA"]} for d in "abcdefg"}}
    answer = {"a": E("x", 6), "b": E("x", 7), "c": E("NA", 10), "d": None, "e": E("y", 10), "f": E("x", None),
              "g": E("x", 6.99)}
    taus = {"a": 7, "b": 7, "c": 1, "d": 1, "e": None, "f": 1, "g": 7}
    out = predict.deployed_profile(answer, taus, tax)
    assert out["a"] == {"label": "NA", "confidence": 6, "evidence": "e", "abstained": True, "model_label": "x"}  # τ − 1
    assert out["b"] == {"label": "x", "confidence": 7, "evidence": "e", "abstained": False, "model_label": "x"}  # at τ
    assert out["c"]["label"] == "NA" and out["c"]["abstained"]  # NA stays NA whatever its confidence
    assert out["d"] == {"label": "NA", "confidence": None, "evidence": None, "abstained": True, "model_label": None}
    assert out["e"]["label"] == "NA" and out["e"]["model_label"] == "y"  # unreachable: abstains even at 10
    assert out["f"]["abstained"] and out["g"]["abstained"]  # no confidence; a pooled 6.99 is below 7
    kept = predict.deployed_profile(answer, None, tax)  # no thresholds: every non-NA label
    assert [kept[d]["label"] for d in "abcdefg"] == ["x", "x", "NA", "NA", "y", "x", "x"]


@pytest.fixture(scope="module")
def users_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    _, _, test = profilebench.make_world(0, 24, seed=7)
    return str(common.write_jsonl(d / "users.jsonl", test) or d / "users.jsonl")


def read_lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def thresholds_file(path, taus):
    path.write_text(json.dumps({"dimensions": {d: {"tau": t} for d, t in taus.items()}}))
    return str(path)


def test_predict_profiles_keep_a_label_exactly_at_its_threshold(users_file, tmp_path):
    """With the simulated teacher (its answers parse): per dimension a τ that some answers sit at and some
    one level below; each kept label has c >= τ, each abstained non-NA one c < τ, both occur; evaluate.py
    on the thresholded profiles gives exactly the precision and recall evaluate.py --thresholds reports
    for the raw ones."""
    taxonomy = load_taxonomy()
    raw = tmp_path / "raw.jsonl"
    predict.main(["--model", "sim", "--users", users_file, "--out", str(raw), "--progress", "false"])
    lines = read_lines(raw)
    assert len(lines) == 24 and all(set(x["profile"]) == set(taxonomy["dimensions"]) for x in lines)
    assert all(not e["abstained"] for x in lines for e in x["profile"].values() if e["model_label"] not in (None, "NA"))
    taus = {}
    for dim in taxonomy["dimensions"]:
        levels = {x["profile"][dim]["confidence"] for x in lines if x["profile"][dim]["model_label"] not in (None, "NA")}
        taus[dim] = max(c for c in levels if c - 1 in levels)
    th = thresholds_file(tmp_path / "thresholds.json", taus)
    cut = tmp_path / "cut.jsonl"
    predict.main(["--model", "sim", "--users", users_file, "--out", str(cut), "--thresholds", th, "--progress", "false"])
    at_tau = at_tau_minus_1 = 0
    for line in read_lines(cut):
        for dim, e in line["profile"].items():
            if e["model_label"] in (None, "NA"):
                assert e["label"] == "NA"
                continue
            assert (e["label"] == e["model_label"]) == (e["confidence"] >= taus[dim]) == (not e["abstained"])
            at_tau += e["confidence"] == taus[dim] and not e["abstained"]
            at_tau_minus_1 += e["confidence"] == taus[dim] - 1 and e["abstained"]
    assert at_tau and at_tau_minus_1
    deployed = evaluate.main(["--predictions", str(cut), "--data", users_file, "--out", str(tmp_path / "e1")])
    applied = evaluate.main(["--predictions", str(raw), "--data", users_file, "--out", str(tmp_path / "e2"),
                             "--thresholds", th])["at_thresholds"]["dimensions"]
    for dim, r in applied.items():
        assert deployed["per_dimension"][dim]["precision"] == r["precision"]
        assert deployed["per_dimension"][dim]["recall"] == r["recall"]


def test_predict_resumes_and_refuses_other_settings_and_foreign_files(users_file, tmp_path):
    base = ["--model", "sim", "--users", users_file, "--batch-users", "5", "--progress", "false"]
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    predict.main(base + ["--out", str(full)])
    text = full.read_text(encoding="utf-8").splitlines(keepends=True)
    cut.write_text(text[0] + text[1] + text[2][:30], encoding="utf-8")  # killed while writing user 3
    shutil.copy(str(full) + ".meta.json", str(cut) + ".meta.json")
    predict.main(base + ["--out", str(cut)])
    assert cut.read_bytes() == full.read_bytes()
    meta = json.loads((tmp_path / "cut.jsonl.meta.json").read_text())
    assert meta["written_by"] == "predict.py" and meta["settings"]["thresholds"] is None
    th = thresholds_file(tmp_path / "t.json", {d: 5 for d in load_taxonomy()["dimensions"]})
    with pytest.raises(ValueError, match=r"cut\.jsonl: written with other settings \(thresholds null -> "):
        predict.main(base + ["--out", str(cut), "--thresholds", th])
    with pytest.raises(ValueError, match=r"max_new_tokens 320 -> 8"):
        predict.main(base + ["--out", str(cut), "--max-new-tokens", "8"])
    assert cut.read_bytes() == full.read_bytes()
    predict.main(base + ["--out", str(cut), "--thresholds", th, "--force-resume"])  # on request: nothing left to do
    assert json.loads((tmp_path / "cut.jsonl.meta.json").read_text())["earlier_settings"][0]["thresholds"] is None
    # inputs and files that are not predict.py's own are never written
    for out, message in ((users_file, r"--out is the input --users"), (th, r"--out is the input --thresholds")):
        with pytest.raises(ValueError, match=message):
            predict.main(base + ["--out", out, "--thresholds", th])
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text('{"user_id": "u0", "samples": []}\n')
    with pytest.raises(ValueError, match=r"teacher\.jsonl:1: expected a profiles line"):
        predict.main(base + ["--out", str(teacher)])
    assert teacher.read_text() == '{"user_id": "u0", "samples": []}\n'


def test_predict_batches_users_shares_prompts_and_matches_greedy_rollout(users_file, tmp_path, monkeypatch, capsys):
    """A checkpoint: users go to rollout.generate --batch-users at a time with n samples per prompt (the
    prompt prefilled once for its samples); greedy profiles are the parse of label.py's greedy texts."""
    from test_rollout import make_chat_checkpoint
    ckpt = make_chat_checkpoint(tmp_path / "ckpt")
    users = tmp_path / "five.jsonl"
    users.write_text("".join(open(users_file, encoding="utf-8").readlines()[:5]))
    calls, real_generate = [], rollout.generate

    def counting_generate(model, prompts, sampling, n=1, **kw):
        calls.append((len(prompts), n))
        return real_generate(model, prompts, sampling, n=n, **kw)

    monkeypatch.setattr(rollout, "generate", counting_generate)
    base = ["--model", ckpt, "--users", str(users), "--max-new-tokens", "6", "--progress", "false"]
    predict.main(base + ["--out", str(tmp_path / "p.jsonl"), "--batch-users", "2"])
    assert calls == [(2, 1), (2, 1), (1, 1)] and "users/s" in capsys.readouterr().out
    predict.main(base + ["--out", str(tmp_path / "v.jsonl"), "--samples", "3", "--temperature", "1"])
    assert calls[-1] == (5, 3)
    label.main(["--teacher", ckpt, "--users", str(users), "--samples", "1", "--temperature", "0", "--max-new-tokens",
                  "6", "--out", str(tmp_path / "r.jsonl"), "--progress", "false"])
    taxonomy = load_taxonomy()
    for p, r in zip(read_lines(tmp_path / "p.jsonl"), read_lines(tmp_path / "r.jsonl")):
        answer, _ = predict.answer_of([r["samples"][0]["text"]], taxonomy)
        assert p["user_id"] == r["user_id"] and p["profile"] == predict.deployed_profile(answer, None, taxonomy)
