"""evaluate.py: every metric against numbers computed by hand on a tiny two-dimension example."""
import json
import random
import re

import pytest

import common
import confprofile
import evaluate

TAXONOMY = {"name": "tiny", "dimensions": {"a": {"description": "", "classes": ["x", "y", "NA"]},
                                           "b": {"description": "", "classes": ["p", "q", "NA"]}}}
USERS = [
    {"user_id": "u1", "labels": {"a": "x", "b": "p"}},
    {"user_id": "u2", "labels": {"a": "y", "b": "NA"}},
    {"user_id": "u3", "labels": {"a": "NA", "b": "q"}},
    {"user_id": "u4", "labels": {"a": "x", "b": "p"}},
    {"user_id": "u5", "labels": {"a": "y", "b": "q"}},  # no prediction: abstains everywhere
]


def P(label, confidence):
    return {"label": label, "confidence": confidence}


PREDS = {
    "u1": {"a": P("x", 8), "b": P("p", 3)},   # a correct,             b correct
    "u2": {"a": P("x", 6), "b": P("p", 9)},   # a wrong,               b false positive on gold NA
    "u3": {"a": P("x", 4), "b": P("NA", 7)},  # a false positive (NA), b abstains
    "u4": {"a": P("NA", 5), "b": P("p", 2)},  # a abstains,            b correct
}


@pytest.fixture(scope="module")
def metrics():
    return evaluate.evaluate(PREDS, USERS, TAXONOMY)


def test_per_dimension_at_tau0(metrics):
    a, b = metrics["per_dimension"]["a"], metrics["per_dimension"]["b"]
    # a: non-abstained u1 (ok), u2 (wrong), u3 (wrong: gold NA) -> P = 1/3; gold non-NA u1 u2 u4 u5 -> R = 1/4
    assert a["precision"] == pytest.approx(1 / 3) and a["recall"] == pytest.approx(1 / 4)
    assert a["f1"] == pytest.approx(2 / 7)  # 2·(1/3)(1/4) / (7/12)
    # b: non-abstained u1 (ok), u2 (false positive on NA), u4 (ok) -> P = 2/3; gold non-NA u1 u3 u4 u5 -> R = 2/4
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == pytest.approx(1 / 2)
    assert b["f1"] == pytest.approx(4 / 7)
    assert metrics["avg_f1"] == pytest.approx(3 / 7)
    assert (a["support"], b["support"]) == (4, 4)
    assert (a["false_positives_on_gold_na"], b["false_positives_on_gold_na"]) == (1, 1)
    assert (a["n_gold_na"], b["n_gold_na"]) == (1, 1)


def test_na_on_gold_na_is_neither():
    users = [{"user_id": "v1", "labels": {"a": "NA", "b": "p"}}, {"user_id": "v2", "labels": {"a": "x", "b": "p"}}]
    m = evaluate.evaluate({"v1": {"a": P("NA", 9), "b": P("p", 9)}, "v2": {"a": P("x", 9), "b": P("p", 9)}}, users, TAXONOMY)
    assert m["per_dimension"]["a"]["precision"] == 1.0 and m["per_dimension"]["a"]["recall"] == 1.0
    assert m["per_dimension"]["a"]["false_positives_on_gold_na"] == 0


def test_missing_users_abstain_and_are_reported(metrics):
    assert metrics["n_missing"] == 1 and metrics["missing_user_ids"] == ["u5"]
    assert metrics["n_users"] == 5


def test_threshold_sweep(metrics):
    sweep = {r["tau"]: r for r in metrics["threshold_sweep"]}
    assert list(sweep) == list(range(1, 11))
    # τ=1: nothing has c < 1, so as at τ=0: mean P (1/3+2/3)/2, mean R (1/4+1/2)/2, mean F1 3/7
    assert sweep[1]["precision"] == pytest.approx(0.5)
    assert sweep[1]["recall"] == pytest.approx(0.375)
    assert sweep[1]["f1"] == pytest.approx(3 / 7)
    # τ=3: b loses u4 (c=2): P_b = 1/2, R_b = 1/4, F1_b = 1/3; a unchanged (2/7)
    assert sweep[3]["f1"] == pytest.approx(13 / 42)
    # τ=5: a keeps u1 (8, ok), u2 (6, wrong): P 1/2, R 1/4, F1 1/3; b keeps u2 (9, wrong): P 0, R 0, F1 0
    assert sweep[5]["precision"] == pytest.approx(0.25)
    assert sweep[5]["recall"] == pytest.approx(0.125)
    assert sweep[5]["f1"] == pytest.approx(1 / 6)
    assert sweep[5]["coverage"] == pytest.approx(3 / 10)  # 3 non-abstained of 5 users x 2 dims
    # τ=9: a predicts nothing (P undefined, left out of the mean), b: u2 wrong -> P 0
    assert sweep[9]["precision"] == 0.0
    # τ=10: nothing predicted anywhere -> P undefined
    assert sweep[10]["precision"] is None and sweep[10]["f1"] == 0.0 and sweep[10]["coverage"] == 0.0


def test_calibration_and_confidence(metrics):
    # non-abstained at τ=0: (8 ok) (6 no) (4 no) (3 ok) (9 no) (2 ok): one per bin, |acc - c/10| =
    # .2 + .6 + .4 + .7 + .9 + .8 = 3.6 over 6
    assert metrics["ece"] == pytest.approx(0.6)
    assert metrics["mean_confidence"] == pytest.approx(32 / 6)
    # positives 8, 3, 2 vs negatives 6, 4, 9: only 8>6 and 8>4 of 9 pairs
    assert metrics["auroc"] == pytest.approx(2 / 9)
    rel = metrics["reliability"]
    assert [r["n"] for r in rel] == [0, 1, 1, 1, 0, 1, 0, 1, 1, 0]
    assert rel[7]["accuracy"] == 1.0 and rel[7]["mean_confidence"] == pytest.approx(0.8)


def test_ece_with_shared_bin():
    # bin (0.7,0.8]: two at 0.8, accuracy 1/2 -> weight 2/4 · 0.3; bin (0.2,0.3]: 0.3 right -> 1/4 · 0.7;
    # bin (0.9,1.0]: 1.0 right -> 0
    assert evaluate.expected_calibration_error([8, 8, 3, 10], [True, False, True, True]) == pytest.approx(0.325)
    assert evaluate.expected_calibration_error([], []) is None


def test_confidence_bins_edges():
    # c/10 in (b/10, (b+1)/10]; 3 must not fall into bin 3 by floating-point rounding of 0.3·10
    assert [evaluate.confidence_bin(c) for c in (0, 1, 2.5, 3, 7, 9.99, 10)] == [0, 0, 2, 2, 6, 9, 9]


def test_auroc_ties_and_degenerate():
    # positives 5, 7 vs negatives 5, 3: tie 1/2 + 1 + 1 + 1 = 3.5 of 4
    assert evaluate.auroc([5, 5, 3, 7], [True, False, False, True]) == pytest.approx(0.875)
    assert evaluate.auroc([1, 2, 3], [True, True, True]) is None
    assert evaluate.auroc([1, 2], [False, True]) == 1.0


def test_precision_recall_f1_edges():
    assert evaluate.precision_recall_f1(0, 0, 5) == (None, 0.0, 0.0)
    assert evaluate.precision_recall_f1(0, 3, 0) == (0.0, None, 0.0)
    assert evaluate.precision_recall_f1(3, 4, 6) == pytest.approx((0.75, 0.5, 0.6))


def test_confusion_matrix(metrics):
    a = metrics["confusion"]["a"]
    assert a["x"] == {"x": 1, "y": 0, "NA": 1, "—": 0}   # u1 -> x, u4 -> NA
    assert a["y"] == {"x": 1, "y": 0, "NA": 0, "—": 1}   # u2 -> x, u5 missing
    assert a["NA"] == {"x": 1, "y": 0, "NA": 0, "—": 0}  # u3 -> x


def test_unknown_user_and_bad_label_are_errors():
    with pytest.raises(ValueError, match="zz"):
        evaluate.evaluate({"zz": {"a": P("x", 5)}}, USERS, TAXONOMY)
    with pytest.raises(ValueError, match=r"u1.*a\.label"):
        evaluate.evaluate({"u1": {"a": P("doctor", 5)}}, USERS, TAXONOMY)


def test_unparseable_profile_counts_as_format_failure():
    m = evaluate.evaluate({"u1": None, "u2": PREDS["u2"]}, USERS, TAXONOMY)
    assert m["format_failure_rate"] == 0.5 and m["n_missing"] == 3


def _answer(a, ca, b="p", cb=5):
    return confprofile.format_answer({"a": {"label": a, "confidence": ca, "evidence": "e"},
                                      "b": {"label": b, "confidence": cb, "evidence": "e"}}, TAXONOMY)


def test_load_predictions_forms_and_vote(tmp_path):
    path = tmp_path / "preds.jsonl"
    lines = [
        {"user_id": "u1", "profile": PREDS["u1"]},
        {"user_id": "u2", "text": "Sure! " + _answer("x", 6)},  # parsed, but not format_ok (prose)
        {"user_id": "u3", "samples": [{"text": _answer("x", 8)}, {"text": _answer("x", 6)}, {"text": _answer("y", 4)},
                                      {"text": "{\"a\": {\"label\": \"x\""}]},  # truncated: no valid dimension
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    ids = {u["user_id"] for u in USERS}
    preds, n_answers, n_fail = evaluate.load_predictions(str(path), TAXONOMY, ids)
    assert preds["u1"] == PREDS["u1"] and preds["u2"]["a"] == P("x", 6)
    assert preds["u3"]["a"] == P("x", 8)  # the first sample
    assert (n_answers, n_fail) == (3, 1)
    preds, n_answers, n_fail = evaluate.load_predictions(str(path), TAXONOMY, ids, use_vote=True)
    # S_x = 8 + 6 = 14, S_y = 4 -> r = 14/18 · mean(8, 6) = 5.444...
    assert preds["u3"]["a"]["label"] == "x"
    assert preds["u3"]["a"]["confidence"] == pytest.approx(14 / 18 * 7)
    assert (n_answers, n_fail) == (6, 2)
    preds, _, _ = evaluate.load_predictions(str(path), TAXONOMY, ids, use_vote=True, weighting="majority")
    assert preds["u3"]["a"]["confidence"] == pytest.approx(2 / 3 * 7)  # S_x = 2, S_y = 1


def test_load_predictions_errors_name_file_and_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"user_id": "u1", "text": "{}"}) + "\n" + json.dumps({"user_id": "ghost", "text": "{}"}) + "\n")
    with pytest.raises(common.DataError, match=r"preds\.jsonl:2: user_id: 'ghost'"):
        evaluate.load_predictions(str(path), TAXONOMY, {"u1"})
    path.write_text(json.dumps({"user_id": "u1", "answer": "{}"}) + "\n")
    with pytest.raises(common.DataError, match=r"preds\.jsonl:1: expected one of the fields"):
        evaluate.load_predictions(str(path), TAXONOMY, {"u1"})


def test_cli_writes_metrics_report_and_curve(tmp_path):
    tax_path, data, preds = tmp_path / "tax.json", tmp_path / "test.jsonl", tmp_path / "preds.jsonl"
    tax_path.write_text(json.dumps(TAXONOMY))
    data.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    preds.write_text("".join(json.dumps({"user_id": uid, "profile": p}) + "\n" for uid, p in PREDS.items()))
    out = tmp_path / "eval"
    evaluate.main(["--predictions", str(preds), "--data", str(data), "--out", str(out), "--taxonomy", str(tax_path)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["avg_f1"] == pytest.approx(3 / 7) and m["n_missing"] == 1 and m["format_failure_rate"] == 0.0
    assert set(m["per_dimension"]["a"]) >= {"precision", "recall", "f1", "support"}
    assert [r["tau"] for r in m["threshold_sweep"]] == list(range(1, 11))
    report = (out / "report.md").read_text()
    assert "| a | 0.333 | 0.250 | 0.286 | 4 |" in report and "### b" in report and "| 5 |" in report
    curve = (out / "pr_curve.csv").read_text().splitlines()
    assert curve[0] == "dimension,tau,precision,recall,f1,n_predicted"
    assert "a,0,0.3333,0.2500,0.2857,3" in curve and "mean,10,,0.0000,0.0000,0" in curve and "mean,0,0.5000,0.3750,0.4286,6" in curve


# -----------------------------------------------------------------------------
# Untrusted prediction and data files


@pytest.mark.parametrize("entry, message", [
    ('{"label": "x", "confidence": 1e9}', r"profile\.a\.confidence: expected a number 0\.\.10"),
    ('{"label": "x", "confidence": -3}', r"profile\.a\.confidence: expected a number 0\.\.10"),
    ('{"label": "x", "confidence": true}', r"profile\.a\.confidence: expected a number 0\.\.10"),
    ('{"label": "x", "confidence": "8"}', r"profile\.a\.confidence: expected a number 0\.\.10"),
    ('{"label": "x", "confidence": NaN}', r"invalid JSON number NaN"),
    ('{"label": "x", "confidence": Infinity}', r"invalid JSON number Infinity"),
    ('{"label": "x", "confidence": 1e999}', r"JSON number 1e999 overflows to infinity"),
    ('"x"', r"profile\.a: expected an object \{\"label\", \"confidence\"\} or null, got str"),
    ('[1]', r"profile\.a: expected an object .* got list"),
    ('{"label": "z", "confidence": 5}', r"profile\.a\.label: expected one of \['x', 'y', 'NA'\], got 'z'"),
    ('{"confidence": 5}', r"profile\.a\.label: expected one of"),
])
def test_prediction_values_are_checked_naming_file_line(tmp_path, entry, message):
    """#13 item 8: a confidence of 1e9 gave ECE 952,380 and a negative one abstained silently; NaN, Infinity and
    non-object entries crashed without file:line. Each is now an error naming file:line:field."""
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"user_id": "u1", "profile": {"b": P("p", 3)}}) + "\n"
                    + '{"user_id": "u2", "profile": {"a": ' + entry + ', "b": null}}\n')
    with pytest.raises(common.DataError, match=r"preds\.jsonl:2: " + message):
        evaluate.load_predictions(str(path), TAXONOMY, {"u1", "u2"})


def test_prediction_labels_match_up_to_case_like_the_parser(tmp_path):
    """#13 item 8: "X" (a label-case mismatch) crashed; it is read as "x", as parse_answer reads answers.
    Confidences 0..10 (pooled 0 included) and null are valid."""
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"user_id": "u1", "profile": {"a": P("X", 0), "b": P(" P ", None)}}) + "\n")
    preds, _, _ = evaluate.load_predictions(str(path), TAXONOMY, {"u1"})
    assert preds["u1"] == {"a": P("x", 0), "b": P("p", None)}


def test_partial_gold_labels_are_unlabelled_for_that_dimension(tmp_path):
    """#13 item 9: a user whose labels leave a dimension out (or null) is unlabelled there: left out of that
    dimension's P / R / F1 and counted, and the other dimensions are scored as usual."""
    users = [dict(u) for u in USERS]
    users[0] = {"user_id": "u1", "labels": {"b": "p"}}           # a missing
    users[1] = {"user_id": "u2", "labels": {"a": "y", "b": None}}  # b null
    m = evaluate.evaluate(PREDS, users, TAXONOMY)
    full = evaluate.evaluate(PREDS, USERS, TAXONOMY)
    assert m["per_dimension"]["a"]["n_unlabelled"] == 1 and m["per_dimension"]["b"]["n_unlabelled"] == 1
    assert m["n_unlabelled"] == 2
    # a without u1 (a correct x at 8): predicted u2, u3 -> 0 correct of 2; gold non-NA u2, u4, u5
    assert m["per_dimension"]["a"]["support"] == full["per_dimension"]["a"]["support"] - 1
    assert m["per_dimension"]["a"]["precision"] == 0.0 and m["per_dimension"]["a"]["n_predicted"] == 2
    # b without u2 (a false positive on gold NA): u1, u4 correct of 2 predicted
    assert m["per_dimension"]["b"]["precision"] == 1.0 and m["per_dimension"]["b"]["false_positives_on_gold_na"] == 0
    assert sum(sum(row.values()) for row in m["confusion"]["a"].values()) == len(USERS) - 1
    # through the CLI: the data file is read, the count reported
    tax_path, data, preds = tmp_path / "tax.json", tmp_path / "test.jsonl", tmp_path / "preds.jsonl"
    tax_path.write_text(json.dumps(TAXONOMY))
    data.write_text("".join(json.dumps(u) + "\n" for u in users))
    preds.write_text("".join(json.dumps({"user_id": uid, "profile": p}) + "\n" for uid, p in PREDS.items()))
    evaluate.main(["--predictions", str(preds), "--data", str(data), "--out", str(tmp_path / "eval"),
                   "--taxonomy", str(tax_path)])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_unlabelled"] == 2
    assert "unlabelled (user, dimension) pairs left out: 2 (a 1, b 1)" in (tmp_path / "eval" / "report.md").read_text()


def test_cli_bad_input_is_one_line(tmp_path):
    """#13 item 12: evaluate.py printed its clear message under a traceback; now one line, exit status 1."""
    tax_path, data, preds = tmp_path / "tax.json", tmp_path / "test.jsonl", tmp_path / "preds.jsonl"
    tax_path.write_text(json.dumps(TAXONOMY))
    data.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    preds.write_text(json.dumps({"user_id": "u1", "profile": {"a": P("x", 1e9)}}) + "\n")
    argv = ["--predictions", str(preds), "--data", str(data), "--out", str(tmp_path / "eval"), "--taxonomy", str(tax_path)]
    for bad, message in ((None, r"preds\.jsonl:1: profile\.a\.confidence: expected a number 0\.\.10"),
                         ("--data", r"No such file or directory"), ("--taxonomy", r"taxonomy file not found")):
        args = list(argv)
        if bad:
            args[args.index(bad) + 1] = str(tmp_path / "missing")
        with pytest.raises(SystemExit) as e:
            common.run_cli(evaluate.main, "evaluate.py", args)
        assert isinstance(e.value.code, str) and "\n" not in e.value.code
        assert e.value.code.startswith("evaluate.py: error: ") and re.search(message, e.value.code), e.value.code


def test_answers_without_a_confidence_are_reported():
    # labels-only answers take part at τ = 0 only and in no calibration figure: their share is reported
    preds = {"u1": {"a": P("x", None), "b": P("p", 3)}, "u2": {"a": P("x", 6), "b": None}}
    m = evaluate.evaluate(preds, USERS[:2], TAXONOMY)
    assert m["no_confidence_rate"] == pytest.approx(1 / 3)  # answered: u1.a (none), u1.b, u2.a
    assert m["mean_confidence"] == pytest.approx(4.5)       # 3 and 6: the labels-only answer is invisible here
    assert "answers without a confidence = 0.333" in evaluate.render_report(m)
    assert evaluate.evaluate(PREDS, USERS, TAXONOMY)["no_confidence_rate"] == 0.0


def test_cli_streams_to_the_metrics_of_evaluate(tmp_path):
    """#16: evaluate.py reads users and predictions line by line into per-(user, dimension) arrays; its
    metrics equal evaluate() on the profiles in memory, whatever the order of the predictions file,
    with partial gold labels, missing and unparseable predictions, and int, float and no confidences."""
    rng = random.Random(1)
    dims = TAXONOMY["dimensions"]
    users = [{"user_id": f"u{i}", "labels": {d: rng.choice(spec["classes"]) for d, spec in dims.items() if rng.random() < 0.9}}
             for i in range(300)]
    profiles = {}
    for u in users:
        if rng.random() < 0.1:
            continue  # missing
        profiles[u["user_id"]] = None if rng.random() < 0.05 else {
            d: None if rng.random() < 0.1 else P(rng.choice(spec["classes"]), rng.choice([None, rng.randint(0, 10),
                                                                                          rng.uniform(0, 10)]))
            for d, spec in dims.items()}
    lines = [{"user_id": uid, "profile": p} for uid, p in profiles.items()]
    rng.shuffle(lines)
    (tmp_path / "tax.json").write_text(json.dumps(TAXONOMY))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(u) + "\n" for u in users))
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cli = evaluate.main(["--predictions", str(tmp_path / "preds.jsonl"), "--data", str(tmp_path / "data.jsonl"),
                         "--out", str(tmp_path / "eval"), "--taxonomy", str(tmp_path / "tax.json")])
    in_memory = evaluate.evaluate(profiles, users, TAXONOMY)
    assert json.dumps({k: v for k, v in cli.items() if k not in ("inputs", "intervals")}) == json.dumps(in_memory)
    # the intervals' estimates are the metrics themselves (the same count table)
    pooled = cli["intervals"]["pooled"]
    for key, metric in (("f1", "avg_f1"), ("ece", "ece"), ("brier", "brier"), ("auroc", "auroc"), ("aurc", "aurc")):
        assert pooled[key]["estimate"] == pytest.approx(in_memory[metric], abs=1e-12), key
        assert pooled[key]["low"] <= pooled[key]["estimate"] <= pooled[key]["high"], key
    assert in_memory["n_missing"] == 300 - len(profiles) > 0 and in_memory["n_unlabelled"] > 0
    assert 0 < in_memory["no_confidence_rate"] < 1 and in_memory["auroc"] is not None
    assert in_memory["format_failure_rate"] == pytest.approx(sum(p is None for p in profiles.values()) / len(profiles))


def test_auroc_from_counts_equals_pairwise_definition():
    """AUROC from per-score counts = P(correct scores above incorrect), ties 1/2, over all pairs."""
    rng = random.Random(2)
    scores = [rng.choice([1, 2, 2.5, 7, 10]) for _ in range(200)]
    correct = [rng.random() < s / 12 for s in scores]
    pos = [s for s, ok in zip(scores, correct) if ok]
    neg = [s for s, ok in zip(scores, correct) if not ok]
    pairwise = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert evaluate.auroc(scores, correct) == pytest.approx(pairwise, abs=1e-12)
    assert evaluate.score_counts([7, 7.0, 2], [True, False, True]) == {7: [1, 1], 2: [1, 0]}
