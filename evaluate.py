"""
Evaluation of profiles against gold labels (docs/design.md, "Evaluation").

A prediction is a label ŷ with a confidence c (the stated 1..10, or a pooled 0..10 after a vote).
At threshold τ it abstains when ŷ = NA or c < τ; a missing or invalid prediction always abstains.
Per dimension d:
    P_d = correct non-abstained / non-abstained      (undefined -> null when nothing is predicted)
    R_d = correct non-abstained / gold non-NA
    F1_d = 2 P R / (P + R)                           (0 when P or R is 0 or undefined)
A non-NA prediction on a gold-NA user is a false positive (non-abstained, never correct); NA on
gold NA is neither. Headline: avg_f1 = mean F1_d over the dimensions at τ = 0. The sweep τ = 1..10
gives, per τ, the mean over dimensions of P (over the dimensions where P is defined), R and F1.
Calibration: ECE over 10 bins of c/10 on the non-abstained predictions at τ = 0, correctness
= (label == gold); AUROC of the same confidences for the same correctness.

CLI: python evaluate.py --predictions preds.jsonl --data test.jsonl --out DIR [--vote] [--weighting confidence|majority]
     [--na-weight W]
A predictions line is {"user_id", "profile": {dim: {"label", "confidence"}}} or {"user_id", "text"}
(parsed with confprofile.parse_answer) or {"user_id", "samples": [{"text", ...}, ...]} (the first
sample, or with --vote the Stage-1 vote of all samples: label ŷ, confidence = pooled confidence).
Writes DIR/metrics.json, DIR/report.md and DIR/pr_curve.csv. The files are read line by line into a
table of a few bytes per (user, dimension) (Table), so memory does not grow with the answers.
"""
import array
import dataclasses
import json
import math
import os

import numpy as np

import common
import confprofile

from common import ConfigError, atomic_write_text, check_fields, load_config, opt, run_cli

TAUS = tuple(range(1, 11))
N_BINS = 10
NO_PREDICTION = "—"  # confusion-matrix column for a missing or invalid prediction

# -----------------------------------------------------------------------------
# Metrics: small pure functions, one per formula


def abstains(label, confidence, tau):
    """Evaluation: a prediction abstains when ŷ = NA or c < τ (missing/invalid: label None, always abstains).
    A prediction without a stated confidence (labels-only) only counts at τ = 0."""
    if label is None or label == "NA":
        return True
    if confidence is None:
        return tau > 0
    return confidence < tau


def count_outcomes(pairs, tau):
    """(non-abstained, correct non-abstained, gold non-NA) over pairs (gold, label, confidence)."""
    n_predicted = n_correct = n_gold = 0
    for gold, label, confidence in pairs:
        n_gold += gold != "NA"
        if abstains(label, confidence, tau):
            continue
        n_predicted += 1
        n_correct += label == gold  # a non-NA label on gold NA is a false positive
    return n_predicted, n_correct, n_gold


def precision_recall_f1(n_correct, n_predicted, n_gold):
    """P = correct non-abstained / non-abstained, R = correct non-abstained / gold non-NA, F1 = 2PR/(P+R).
    P (R) is None when its denominator is 0; F1 is 0 unless both are positive."""
    precision = n_correct / n_predicted if n_predicted else None
    recall = n_correct / n_gold if n_gold else None
    if not precision or not recall:
        return precision, recall, 0.0
    return precision, recall, 2 * precision * recall / (precision + recall)


def no_confidence_rate(answers):
    """Share of the answered dimensions, (label, confidence) pairs, that state no confidence (the
    labels-only form): they take part at τ = 0 only and in no calibration figure (ECE, reliability,
    mean confidence), so a policy that learnt to drop its confidences would be invisible there."""
    n_answers = n_without = 0
    for _, c in answers:
        n_answers += 1
        n_without += c is None
    return n_without / n_answers if n_answers else 0.0


def mean_defined(values):
    """Mean of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def confidence_bin(confidence, n_bins=N_BINS):
    """Bin of c/10 in ((b)/n_bins, (b+1)/n_bins], b = 0..n_bins-1 (c = 0 goes to bin 0).
    Computed as ceil(c·n_bins/10) - 1 so that integer confidences never land in the wrong bin by rounding."""
    return min(n_bins - 1, max(0, math.ceil(confidence * n_bins / 10) - 1))


def reliability_table(confidences, correct, n_bins=N_BINS):
    """Per bin of c/10: n, mean c/10 and accuracy (the reliability diagram as rows)."""
    rows = [{"bin": f"({b / n_bins:.1f}, {(b + 1) / n_bins:.1f}]", "n": 0, "mean_confidence": None, "accuracy": None}
            for b in range(n_bins)]
    sums = [[0.0, 0] for _ in range(n_bins)]
    for c, ok in zip(confidences, correct):
        b = confidence_bin(c, n_bins)
        rows[b]["n"] += 1
        sums[b][0] += c / 10
        sums[b][1] += bool(ok)
    for row, (conf_sum, n_ok) in zip(rows, sums):
        if row["n"]:
            row["mean_confidence"] = conf_sum / row["n"]
            row["accuracy"] = n_ok / row["n"]
    return rows


def expected_calibration_error(confidences, correct, n_bins=N_BINS):
    """ECE = Σ_b (n_b / n) · |accuracy_b − mean(c/10)_b| over 10 bins of c/10 (None when n = 0)."""
    return calibration_error(reliability_table(confidences, correct, n_bins))


def calibration_error(rows):
    """ECE from the reliability rows: Σ_b (n_b / n) · |accuracy_b − mean(c/10)_b|, n = Σ_b n_b (None when n = 0)."""
    n = sum(r["n"] for r in rows)
    if n == 0:
        return None
    return sum(r["n"] / n * abs(r["accuracy"] - r["mean_confidence"]) for r in rows if r["n"])


def auroc(scores, correct):
    """AUROC of a score for correctness = P(score of a correct item > score of an incorrect one),
    ties counting 1/2 (the Mann–Whitney U statistic over n_correct · n_incorrect). None if either is empty."""
    return auroc_from_counts(score_counts(scores, correct))


def score_counts(scores, correct):
    """{score: [n correct, n incorrect]}: all that AUROC needs, one entry per distinct score (confidences
    are few levels, so a million predictions count in a few entries)."""
    counts = {}
    for s, ok in zip(scores, correct):
        counts.setdefault(s, [0, 0])[0 if ok else 1] += 1
    return counts


def auroc_from_counts(counts):
    """AUROC from score_counts: the correct items' rank sum (1-based ranks, ascending score, tied scores
    sharing their mean rank) minus its minimum n_pos(n_pos + 1)/2, over n_pos · n_neg. None if either is 0."""
    n_pos = sum(pos for pos, _ in counts.values())
    n_neg = sum(neg for _, neg in counts.values())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum, i = 0.0, 0
    for score in sorted(counts):  # one run of tied scores each
        pos, neg = counts[score]
        j = i + pos + neg
        rank_sum += (i + 1 + j) / 2 * pos
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def confusion_matrix(pairs, classes):
    """{gold: {predicted: count}} over all classes; column NO_PREDICTION for a missing/invalid prediction."""
    columns = list(classes) + [NO_PREDICTION]
    matrix = {g: {p: 0 for p in columns} for g in classes}
    for gold, label, _ in pairs:
        matrix[gold][label if label is not None else NO_PREDICTION] += 1
    return matrix


# -----------------------------------------------------------------------------
# The evaluation table: per (user, dimension) the gold class, the predicted class and its confidence,
# in three numpy arrays, so that a million users cost ~60 MB rather than their profiles. evaluate()
# fills it from profiles in memory, main() from the files line by line; metrics_from_table reads it.


@dataclasses.dataclass
class Table:
    """Gold and predicted class and confidence per (user, dimension): all the metrics read."""
    classes: list  # per dimension, its class names (the indices below point into them)
    user_ids: list  # in the order of the evaluation data
    gold: np.ndarray  # [users, dims] int32 gold class; -1: unlabelled in that dimension
    label: np.ndarray  # [users, dims] int32 predicted class; -1: no valid prediction
    confidence: np.ndarray  # [users, dims] float64 stated confidence; NaN: none
    answered: np.ndarray  # [users] bool: the user has a prediction


def gold_table(users, taxonomy):
    """(Table without predictions, {user_id: row}) from gold users (any iterable of records, in order).
    Only the labels are kept. A user without labels, or with a label that is no class, is an error."""
    dims = taxonomy["dimensions"]
    index = {name: {c: k for k, c in enumerate(spec["classes"])} for name, spec in dims.items()}
    gold, row_of = array.array("i"), {}
    for user in users:
        labels = user.get("labels")
        if not isinstance(labels, dict):
            raise ValueError(f"user {user.get('user_id')!r}: labels: missing; evaluation data needs gold labels")
        for dim, spec in dims.items():
            g = labels.get(dim)  # missing or null: unlabelled there (questionnaires have gaps)
            if g is not None and g not in index[dim]:
                raise ValueError(f"user {user['user_id']!r}: labels.{dim}: expected one of {spec['classes']}, got {g!r}")
            gold.append(-1 if g is None else index[dim][g])
        row_of[user["user_id"]] = len(row_of)
    n, d = len(row_of), len(dims)
    table = Table([spec["classes"] for spec in dims.values()], list(row_of),
                  np.frombuffer(gold, dtype=np.int32).reshape(n, d).copy() if n else np.zeros((0, d), np.int32),
                  np.full((n, d), -1, np.int32), np.full((n, d), np.nan), np.zeros(n, bool))
    return table, row_of


def set_prediction(table, row, uid, profile, taxonomy):
    """Enter one user's profile {dim: {"label", "confidence"} | None} | None into row `row` of the table.
    A dimension where the user is unlabelled is not looked at; elsewhere an entry that is not an object,
    a label that is no class or a confidence that is not a number 0..10 is a ValueError."""
    table.answered[row] = True
    profile = profile or {}
    for j, (dim, spec) in enumerate(taxonomy["dimensions"].items()):
        entry = profile.get(dim)
        if table.gold[row, j] < 0 or entry is None:
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"prediction for {uid!r}: {dim}: expected an object {{label, confidence}} "
                             f"or null, got {type(entry).__name__}")
        label, confidence = entry.get("label"), entry.get("confidence")
        if label not in spec["classes"]:
            raise ValueError(f"prediction for {uid!r}: {dim}.label: expected one of {spec['classes']}, got {label!r}")
        if confidence is not None and not valid_confidence(confidence):
            raise ValueError(f"prediction for {uid!r}: {dim}.confidence: expected a number 0..10, got {confidence!r}")
        table.label[row, j] = spec["classes"].index(label)
        table.confidence[row, j] = math.nan if confidence is None else confidence


def dimension_pairs(table, j):
    """(gold, label | None, confidence | None) for every user labelled in dimension j, in user order."""
    classes = table.classes[j]
    rows = np.flatnonzero(table.gold[:, j] >= 0)
    gold, label, conf = table.gold[rows, j].tolist(), table.label[rows, j].tolist(), table.confidence[rows, j].tolist()
    return [(classes[g], classes[y] if y >= 0 else None, None if c != c else c)  # c != c: NaN, no confidence
            for g, y, c in zip(gold, label, conf)]


def valid_confidence(c):
    """A prediction's confidence: a finite number in 0..10 (stated 1..10, or a pooled 0..10 after a vote)."""
    return not isinstance(c, bool) and isinstance(c, (int, float)) and math.isfinite(c) and 0 <= c <= 10


def evaluate(pred_profiles, users, taxonomy, format_failure_rate=None, taus=TAUS):
    """Metrics of docs/design.md "Evaluation" for pred_profiles {user_id: {dim: {"label", "confidence"} | None} | None}
    against users with gold labels. A user absent from pred_profiles abstains everywhere and is
    reported in n_missing / missing_user_ids; a user_id not in users is an error. A user whose labels
    leave a dimension out (or null) is unlabelled there: left out of that dimension's counts and
    reported per dimension (n_unlabelled) and in all. format_failure_rate defaults to the share of
    given profiles that are None (unparseable)."""
    known = {u["user_id"] for u in users}
    unknown = [uid for uid in pred_profiles if uid not in known]
    if unknown:
        raise ValueError(f"predictions: user_id {unknown[0]!r} (and {len(unknown) - 1} more) not in the evaluation data")
    if format_failure_rate is None:
        given = list(pred_profiles.values())
        format_failure_rate = sum(p is None for p in given) / len(given) if given else 0.0
    table, row_of = gold_table(users, taxonomy)
    for uid, row in row_of.items():
        if uid in pred_profiles:
            set_prediction(table, row, uid, pred_profiles[uid], taxonomy)
    return metrics_from_table(table, taxonomy, format_failure_rate, taus)


def metrics_from_table(table, taxonomy, format_failure_rate, taus=TAUS):
    """evaluate()'s metrics from a filled Table (see evaluate)."""
    dims = list(taxonomy["dimensions"])
    per_dimension, curves, confusion = {}, {d: [] for d in dims}, {}
    for j, dim in enumerate(dims):
        pairs = dimension_pairs(table, j)
        for tau in (0,) + tuple(taus):
            n_predicted, n_correct, n_gold = count_outcomes(pairs, tau)
            p, r, f1 = precision_recall_f1(n_correct, n_predicted, n_gold)
            curves[dim].append({"tau": tau, "precision": p, "recall": r, "f1": f1, "n_predicted": n_predicted})
        at0 = curves[dim][0]
        n_gold_na = sum(1 for g, _, _ in pairs if g == "NA")
        per_dimension[dim] = {
            "precision": at0["precision"], "recall": at0["recall"], "f1": at0["f1"],
            "support": sum(1 for g, _, _ in pairs if g != "NA"),
            "n_predicted": at0["n_predicted"], "n_gold_na": n_gold_na,
            "false_positives_on_gold_na": sum(1 for g, y, _ in pairs if g == "NA" and y not in (None, "NA")),
            "n_unlabelled": len(table.user_ids) - len(pairs),
        }
        confusion[dim] = confusion_matrix(pairs, table.classes[j])
    n_cells = int((table.gold >= 0).sum())  # labelled (user, dimension) cells
    threshold_sweep = []
    for i, tau in enumerate(taus, start=1):
        rows = [curves[d][i] for d in dims]
        threshold_sweep.append({
            "tau": tau,
            "precision": mean_defined(r["precision"] for r in rows),
            "recall": mean_defined(r["recall"] for r in rows),
            "f1": sum(r["f1"] for r in rows) / len(rows),
            "coverage": sum(r["n_predicted"] for r in rows) / n_cells if n_cells else 0.0,
        })

    def scored():  # (confidence, correct) of the non-abstained predictions at τ = 0, all dimensions pooled
        for j in range(len(dims)):
            for gold, label, confidence in dimension_pairs(table, j):
                if not abstains(label, confidence, 0) and confidence is not None:
                    yield confidence, label == gold

    reliability = reliability_table((c for c, _ in scored()), (ok for _, ok in scored()))
    n_scored = sum(r["n"] for r in reliability)
    answered = ((label, confidence) for j in range(len(dims)) for _, label, confidence in dimension_pairs(table, j)
                if label is not None)
    missing = [uid for uid, has in zip(table.user_ids, table.answered.tolist()) if not has]
    return {
        "avg_f1": sum(per_dimension[d]["f1"] for d in dims) / len(dims),
        "per_dimension": per_dimension,
        "threshold_sweep": threshold_sweep,
        "ece": calibration_error(reliability),
        "auroc": auroc_from_counts(score_counts((c for c, _ in scored()), (ok for _, ok in scored()))),
        "mean_confidence": sum(c for c, _ in scored()) / n_scored if n_scored else None,
        "no_confidence_rate": no_confidence_rate(answered),
        "format_failure_rate": format_failure_rate,
        "n_users": len(table.user_ids),
        "n_missing": len(missing),
        "n_unlabelled": sum(per_dimension[d]["n_unlabelled"] for d in dims),  # (user, dimension) cells left out
        "missing_user_ids": missing[:20],
        "reliability": reliability,
        "confusion": confusion,
        "curves": curves,
    }


# -----------------------------------------------------------------------------
# Reading predictions (the CLI's input)


def profile_from_parse(parsed):
    """parse_answer result -> profile {dim: {"label", "confidence"} | None} (None when unparseable)."""
    dims = parsed["dims"]
    if all(v is None for v in dims.values()):
        return None
    return {d: (None if v is None else {"label": v["label"], "confidence": v["confidence"]}) for d, v in dims.items()}


def profile_from_vote(voted):
    """vote() result -> profile whose confidence is the pooled confidence r."""
    if all(v is None for v in voted.values()):
        return None
    return {d: (None if v is None else {"label": v["label"], "confidence": v["pooled_confidence"]}) for d, v in voted.items()}


def load_predictions(path, taxonomy, known_ids, use_vote=False, weighting="confidence", na_weight=1.0):
    """Read a predictions JSONL -> (pred_profiles, n_answers, n_format_failures): iter_predictions, all
    profiles in memory."""
    pred_profiles, n_answers, n_failures = {}, 0, 0
    for uid, profile, answers, failures in iter_predictions(path, taxonomy, known_ids, use_vote, weighting, na_weight):
        pred_profiles[uid] = profile
        n_answers += answers
        n_failures += failures
    return pred_profiles, n_answers, n_failures


def iter_predictions(path, taxonomy, known_ids, use_vote=False, weighting="confidence", na_weight=1.0):
    """Read a predictions JSONL one line at a time -> yields (user_id, profile, answers read, format failures).

    Errors name file, line and field: malformed JSON (NaN and Infinity included), a missing user_id,
    a user_id that is not in the evaluation data, a duplicate user_id, a line with none of profile /
    text / samples, and in a profile an entry that is not an object or null, a label that is no class
    (labels match up to case and separators, as parse_answer's do: "Male" is read as "male"), or a
    confidence that is not a number 0..10 (1e9 or -3 would otherwise skew ECE or abstain silently)."""
    first_line = {}
    for lineno, where, record in common.iter_jsonl(path, expected="one prediction object per line", strict=True):
        uid = record.get("user_id") if isinstance(record, dict) else None
        if not isinstance(uid, str):
            raise common.DataError(f"{where}: user_id: expected a string, got {uid!r}")
        if uid not in known_ids:
            raise common.DataError(f"{where}: user_id: {uid!r} is not in the evaluation data; expected one of its ids")
        if uid in first_line:
            raise common.DataError(f"{where}: user_id: duplicate {uid!r} (first on line {first_line[uid]})")
        first_line[uid] = lineno
        if "profile" in record:
            profile = record["profile"]
            if profile is not None and not isinstance(profile, dict):
                raise common.DataError(f"{where}: profile: expected an object {{dim: {{label, confidence}}}} or null")
            if profile is not None:
                profile = checked_profile(profile, taxonomy, where)
            yield uid, profile, 1, profile is None
        elif "text" in record:
            parsed = confprofile.parse_answer(record["text"], taxonomy)
            yield uid, profile_from_parse(parsed), 1, not parsed["format_ok"]
        elif "samples" in record:
            samples = record["samples"]
            if not isinstance(samples, list) or not samples or not all(isinstance(s, dict) for s in samples):
                raise common.DataError(f"{where}: samples: expected a non-empty list of {{\"text\", ...}} objects")
            parsed = [confprofile.parse_answer(s.get("text"), taxonomy) for s in (samples if use_vote else samples[:1])]
            failures = sum(not p["format_ok"] for p in parsed)
            if use_vote:
                yield uid, profile_from_vote(confprofile.vote(parsed, taxonomy, weighting, na_weight)), len(parsed), failures
            else:
                yield uid, profile_from_parse(parsed[0]), len(parsed), failures
        else:
            raise common.DataError(f"{where}: expected one of the fields profile, text, samples")


def checked_profile(profile, taxonomy, where):
    """A predictions line's "profile", validated (DataError "file:line: profile.dim.field: ...") and with
    labels in the taxonomy's spelling. Keys that are not dimensions are ignored, as parse_answer does."""
    out = {}
    for dim, spec in taxonomy["dimensions"].items():
        entry = profile.get(dim)
        if entry is None:
            out[dim] = None
            continue
        field = f"{where}: profile.{dim}"
        if not isinstance(entry, dict):
            raise common.DataError(f"{field}: expected an object {{\"label\", \"confidence\"}} or null, "
                                        f"got {type(entry).__name__}")
        label = entry.get("label")
        canonical = confprofile.class_by_name(spec["classes"], label) if isinstance(label, str) else None
        if canonical is None:
            raise common.DataError(f"{field}.label: expected one of {spec['classes']}, got {label!r}")
        confidence = entry.get("confidence")
        if confidence is not None and not valid_confidence(confidence):
            raise common.DataError(f"{field}.confidence: expected a number 0..10 (stated 1..10, pooled 0..10) "
                                        f"or null, got {confidence!r}")
        out[dim] = {"label": canonical, "confidence": confidence}
    return out


# -----------------------------------------------------------------------------
# Reports


def _fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def render_report(metrics, title="Evaluation"):
    """report.md: per-dimension table, the τ sweep, the reliability table, confusion matrices."""
    m = metrics
    lines = [f"# {title}", "",
             f"users: {m['n_users']} (missing predictions: {m['n_missing']}); **avg F1 = {_fmt(m['avg_f1'])}**; "
             f"ECE = {_fmt(m['ece'])}; AUROC = {_fmt(m['auroc'])}; mean confidence = {_fmt(m['mean_confidence'], 2)}; "
             f"format failure rate = {_fmt(m['format_failure_rate'])}; answers without a confidence = "
             f"{_fmt(m['no_confidence_rate'])}", ""]
    if m["missing_user_ids"]:
        lines += [f"missing (first {len(m['missing_user_ids'])}): {', '.join(m['missing_user_ids'])}", ""]
    if m.get("n_unlabelled"):
        by_dim = ", ".join(f"{d} {r['n_unlabelled']}" for d, r in m["per_dimension"].items() if r["n_unlabelled"])
        lines += [f"unlabelled (user, dimension) pairs left out: {m['n_unlabelled']} ({by_dim})", ""]
    lines += ["## Per dimension (τ = 0)", "",
              "| dimension | precision | recall | F1 | support | predicted | gold NA | false positives on gold NA |",
              "|---|---|---|---|---|---|---|---|"]
    for dim, r in m["per_dimension"].items():
        lines.append(f"| {dim} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | {r['support']} | "
                     f"{r['n_predicted']} | {r['n_gold_na']} | {r['false_positives_on_gold_na']} |")
    lines += ["", "## Threshold sweep (means over dimensions; abstain when NA or c < τ)", "",
              "| τ | precision | recall | F1 | coverage |", "|---|---|---|---|---|"]
    for r in m["threshold_sweep"]:
        lines.append(f"| {r['tau']} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | {_fmt(r['coverage'])} |")
    lines += ["", "## Reliability (non-abstained predictions at τ = 0, all dimensions)", "",
              "| c/10 bin | n | mean c/10 | accuracy |", "|---|---|---|---|"]
    for r in m["reliability"]:
        lines.append(f"| {r['bin']} | {r['n']} | {_fmt(r['mean_confidence'])} | {_fmt(r['accuracy'])} |")
    lines += ["", f"## Confusion matrices (rows: gold, columns: predicted; {NO_PREDICTION} = no valid prediction)"]
    for dim, matrix in m["confusion"].items():
        columns = list(next(iter(matrix.values())))
        lines += ["", f"### {dim}", "", "| gold \\ predicted | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for gold, row in matrix.items():
            lines.append(f"| {gold} | " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def render_pr_curve(metrics):
    """pr_curve.csv: one row per (dimension or "mean", τ = 0..10)."""
    rows = ["dimension,tau,precision,recall,f1,n_predicted"]
    for dim, curve in metrics["curves"].items():
        for r in curve:
            rows.append(f"{dim},{r['tau']},{_fmt(r['precision'], 4)},{_fmt(r['recall'], 4)},{r['f1']:.4f},{r['n_predicted']}")
    curves = list(metrics["curves"].values())
    for i, tau in enumerate(r["tau"] for r in curves[0]):  # the mean over dimensions, as in threshold_sweep
        at = [c[i] for c in curves]
        rows.append(f"mean,{tau},{_fmt(mean_defined(r['precision'] for r in at), 4)},"
                    f"{_fmt(mean_defined(r['recall'] for r in at), 4)},{sum(r['f1'] for r in at) / len(at):.4f},"
                    f"{sum(r['n_predicted'] for r in at)}")
    return "\n".join(rows).replace("—", "") + "\n"


@dataclasses.dataclass
class EvaluateConfig:
    predictions: str = opt("", "predictions JSONL: one line per user with profile, text or samples", nonempty=True)
    data: str = opt("", "users JSONL with gold labels (e.g. test.jsonl)", nonempty=True)
    out: str = opt("", "output folder for metrics.json, report.md, pr_curve.csv", nonempty=True)
    vote: bool = opt(False, "with samples: the Stage-1 vote of all samples instead of the first")
    weighting: str = opt("confidence", "vote weighting", choices=confprofile.WEIGHTINGS)
    na_weight: float = opt(1.0, "weight of the NA votes (rl.py's na_weight)", min=0)
    taxonomy: str = opt("", "taxonomy JSON (empty: taxonomy.json of the repository)")

    def __post_init__(self):
        check_fields(self, "evaluate")


def main(argv=None):
    args, rest = load_config(EvaluateConfig, argv, prog="evaluate.py", description=__doc__.strip().split("\n\n")[0])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --key value (see --help)")
    taxonomy = confprofile.load_taxonomy(args.taxonomy or None)
    # one user or prediction at a time: memory holds the table (a few bytes per user and dimension)
    users = (u for _, u in confprofile.iter_users(args.data, require_labels=True, taxonomy=taxonomy))
    table, row_of = gold_table(users, taxonomy)
    n_answers = n_failures = 0
    for uid, profile, answers, failures in iter_predictions(args.predictions, taxonomy, row_of, args.vote,
                                                            args.weighting, args.na_weight):
        set_prediction(table, row_of[uid], uid, profile, taxonomy)
        n_answers += answers
        n_failures += failures
    metrics = metrics_from_table(table, taxonomy, n_failures / n_answers if n_answers else 0.0)
    metrics["inputs"] = {"predictions": args.predictions, "data": args.data, "vote": args.vote,
                         "weighting": args.weighting, "na_weight": args.na_weight, "n_answers": n_answers}
    summary = {k: v for k, v in metrics.items() if k != "curves"}
    atomic_write_text(os.path.join(args.out, "metrics.json"), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(os.path.join(args.out, "report.md"), render_report(metrics, f"Evaluation of {args.predictions}"))
    atomic_write_text(os.path.join(args.out, "pr_curve.csv"), render_pr_curve(metrics))
    sweep = " ".join(f"{r['tau']}:{_fmt(r['precision'], 2)}" for r in metrics["threshold_sweep"])
    print(f"avg_f1 {metrics['avg_f1']:.4f} | ece {_fmt(metrics['ece'])} | auroc {_fmt(metrics['auroc'])} | "
          f"format failures {metrics['format_failure_rate']:.3f} | missing {metrics['n_missing']} | "
          + (f"unlabelled (user, dim) {metrics['n_unlabelled']} | " if metrics["n_unlabelled"] else "")
          + f"precision@tau {sweep}")
    return metrics


if __name__ == "__main__":
    run_cli(main, "evaluate.py")
