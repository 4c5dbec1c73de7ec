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
= (label == gold), MCE (its worst bin) beside it; AUROC of the same confidences for the same correctness.
Confidence as a probability of being right (p = c/10, the same predictions): the Brier score with
Murphy's decomposition (one bin per confidence level: exact), and risk–coverage (AURC, E-AURC, risk at 50 %
and 80 % coverage; each confidence level one block, ties in random order). All of these, pooled and per
dimension, are functions of one count table (cell_codes, count_table); the bootstrap over users reweights
that table by how often each user was drawn (bootstrap_headline), so intervals need no second read.

Thresholds for deployment (docs/design.md, "Thresholds"): per dimension the smallest τ in 1..10 whose
precision's one-sided Wilson lower bound L (wilson_lower_bound, 95 % by default, Bonferroni-corrected
over the levels searched: bonferroni_z) reaches a target precision; no such τ: unreachable (the dimension abstains everywhere), reported with its best τ.
Without labels: per dimension the smallest τ that keeps at most a target share of the users
(coverage_threshold; precision unknown). predict.py applies the thresholds.

CLI: python evaluate.py --predictions preds.jsonl --data test.jsonl --out DIR [--vote] [--weighting confidence|majority]
     [--na-weight W] [--target-precision 0.9 [--dimension-targets '{"gender": 0.95}'] [--bound-level 0.95] [--bound-correction bonferroni|none]]
     [--thresholds thresholds.json]
     [--bootstrap 1000] [--seed 0]
     python evaluate.py --predictions preds.jsonl --out DIR --target-coverage 0.3      (no labels)
     python evaluate.py compare A.jsonl B.jsonl [C.jsonl ...] --data test.jsonl --out DIR [--names '["a", "b"]']
         [--vote] [--bootstrap 1000] [--seed 0]       (paired differences from A -> DIR/comparison.json, .md)
A predictions line is {"user_id", "profile": {dim: {"label", "confidence"}}} (predict.py's profiles
too) or {"user_id", "text"} (parsed with confprofile.parse_answer) or {"user_id", "samples": [{"text",
...}, ...]} (the first sample, or with --vote the Stage-1 vote of all samples: label ŷ, confidence =
pooled confidence). Writes DIR/metrics.json (with "intervals": 95 % percentile-bootstrap intervals over
users, unless --bootstrap 0), DIR/report.md (embedding DIR/pr_curve.png, DIR/reliability.png and
DIR/risk_coverage.png), DIR/pr_curve.csv; with a target, DIR/thresholds.json; with --thresholds, the
precision, recall and recall cost at those τ in metrics.json ("at_thresholds") and report.md. The
files are read line by line into a table of a few bytes per (user, dimension) (Table), so memory does
not grow with the answers.
"""
import array
import dataclasses
import json
import math
import os
import statistics
import sys

import numpy as np

import common
import confprofile
import plots

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
    """Per bin of c/10: n, mean c/10 and accuracy (the reliability diagram as rows), from the predictions one by
    one. oracle: the fast path (reliability_from_levels, from counts per confidence level) is tested against this."""
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
    """ECE = Σ_b (n_b / n) · |accuracy_b − mean(c/10)_b| over 10 bins of c/10 (None when n = 0), from the
    predictions one by one. oracle: the fast path (calibration_error of reliability_from_levels) is tested against this."""
    return calibration_error(reliability_table(confidences, correct, n_bins))


def calibration_error(rows):
    """ECE from the reliability rows: Σ_b (n_b / n) · |accuracy_b − mean(c/10)_b|, n = Σ_b n_b (None when n = 0)."""
    n = sum(r["n"] for r in rows)
    if n == 0:
        return None
    return sum(r["n"] / n * abs(r["accuracy"] - r["mean_confidence"]) for r in rows if r["n"])


def auroc(scores, correct):
    """AUROC of a score for correctness = P(score of a correct item > score of an incorrect one),
    ties counting 1/2 (the Mann–Whitney U statistic over n_correct · n_incorrect). None if either is empty.
    oracle: the fast path (auroc_from_levels, from the count table) is tested against this."""
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
    sharing their mean rank) minus its minimum n_pos(n_pos + 1)/2, over n_pos · n_neg. None if either is 0.
    oracle (with auroc): the fast path, auroc_from_levels, is tested against this."""
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


# -----------------------------------------------------------------------------
# Confidence as a probability of being right (docs/design.md, "Evaluation"): p = c/10 on the
# non-abstained predictions at τ = 0 that state a confidence. Every formula below reads counts per
# distinct confidence level — `levels` (ascending c), `right` and `wrong` (counts, possibly bootstrap-
# weighted) — never the predictions themselves, so a million predictions cost a few numbers per level.

EULER_GAMMA = 0.5772156649015329
_HARMONIC_SMALL = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, 64))])  # H_0 .. H_63, exact sums
RISK_COVERAGES = (0.5, 0.8)


def harmonic(n):
    """Harmonic numbers H_n = Σ_{i=1..n} 1/i (H_0 = 0), elementwise for integers n ≥ 0: the exact sum below
    64, above it the asymptotic series ln n + γ + 1/(2n) − 1/(12n²) + 1/(120n⁴) − 1/(252n⁶) (its error
    there is below 1e-17)."""
    n = np.asarray(n, dtype=np.float64)
    small = n < 64
    big = np.where(small, 64.0, n)
    inv2 = 1.0 / (big * big)
    series = np.log(big) + EULER_GAMMA + 0.5 / big - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252))
    return np.where(small, _HARMONIC_SMALL[np.where(small, n, 0).astype(np.int64)], series)


def _level_arrays(levels, right, wrong):
    return (np.asarray(levels, dtype=np.float64), np.asarray(right, dtype=np.float64),
            np.asarray(wrong, dtype=np.float64))


def brier_score(levels, right, wrong):
    """Brier score of p = c/10 as the probability of being right, over the predictions counted:
        BS = (1/n) Σ_l [right_l (1 − p_l)² + wrong_l p_l²],  p_l = c_l / 10,  n = Σ_l (right_l + wrong_l)
    — the mean of (p − 1[correct])². 0 is perfect; always saying 0.5 scores 0.25. None when n = 0."""
    c, right, wrong = _level_arrays(levels, right, wrong)
    n = right.sum() + wrong.sum()
    if n == 0:
        return None
    p = c / 10
    return float((right * (1 - p) ** 2 + wrong * p ** 2).sum() / n)


def murphy_decomposition(levels, right, wrong):
    """Murphy's decomposition of the Brier score, one bin per confidence level (n_l predictions at p_l =
    c_l/10, ō_l = right_l / n_l of them right, ō = Σ right / n overall):
        REL = (1/n) Σ_l n_l (p_l − ō_l)²    reliability: how far each level's accuracy is from its p (↓)
        RES = (1/n) Σ_l n_l (ō_l − ō)²      resolution: how much the levels' accuracies differ (↑)
        UNC = ō (1 − ō)                      uncertainty: of the outcomes alone
    and BS = REL − RES + UNC exactly: within a bin every forecast is the same p_l, so nothing is lost to
    binning (with bins that mix forecast values the identity holds only up to a within-bin term).
    Returns {"reliability", "resolution", "uncertainty"}; None when n = 0."""
    c, right, wrong = _level_arrays(levels, right, wrong)
    n_l = right + wrong
    n = n_l.sum()
    if n == 0:
        return None
    used = n_l > 0
    p, n_l, acc = c[used] / 10, n_l[used], right[used] / n_l[used]
    o = right.sum() / n
    return {"reliability": float((n_l * (p - acc) ** 2).sum() / n),
            "resolution": float((n_l * (acc - o) ** 2).sum() / n), "uncertainty": float(o * (1 - o))}


def reliability_from_levels(levels, right, wrong, n_bins=N_BINS):
    """The reliability rows of reliability_table from counts per level: bin b = confidence_bin(c_l) gathers
    its levels, n_b = Σ n_l, mean(c/10)_b = Σ n_l c_l/10 / n_b, accuracy_b = Σ right_l / n_b."""
    c, right, wrong = _level_arrays(levels, right, wrong)
    bins = np.clip(np.ceil(c * n_bins / 10) - 1, 0, n_bins - 1).astype(np.int64)  # confidence_bin, vectorised
    n_b = np.bincount(bins, weights=right + wrong, minlength=n_bins)
    conf_b = np.bincount(bins, weights=(right + wrong) * c / 10, minlength=n_bins)
    right_b = np.bincount(bins, weights=right, minlength=n_bins)
    rows = []
    for b in range(n_bins):
        n = float(n_b[b])
        rows.append({"bin": f"({b / n_bins:.1f}, {(b + 1) / n_bins:.1f}]", "n": int(n) if n == int(n) else n,
                     "mean_confidence": float(conf_b[b] / n) if n else None,
                     "accuracy": float(right_b[b] / n) if n else None})
    return rows


def max_calibration_error(rows):
    """MCE, the worst bin: max_b |accuracy_b − mean(c/10)_b| over the non-empty bins of the reliability rows
    (None when all are empty). Read it with each bin's n: a bin of 3 predictions can make it alone."""
    gaps = [abs(r["accuracy"] - r["mean_confidence"]) for r in rows if r["n"]]
    return max(gaps) if gaps else None


def auroc_from_levels(levels, right, wrong):
    """AUROC of the confidence for correctness from counts per level (ascending):
        AUROC = (Σ_l right_l · rank_l − n₊(n₊ + 1)/2) / (n₊ n₋),  rank_l = (i_l + 1 + i_l + n_l) / 2
    the mean 1-based rank of level l's predictions (i_l of them below it; tied confidences share it,
    so a tie counts ½): the Mann–Whitney statistic. None when n₊ or n₋ is 0."""
    _, right, wrong = _level_arrays(levels, right, wrong)
    n_pos, n_neg = right.sum(), wrong.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    n_l = right + wrong
    below = np.cumsum(n_l) - n_l
    rank_sum = (right * (below + 1 + below + n_l) / 2).sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _blocks(levels, right, wrong):
    """Confidence levels as blocks, highest first: (n_b, e_b wrong, K before, E wrong before), non-empty only."""
    _, right, wrong = _level_arrays(levels, right, wrong)
    n_b, e_b = (right + wrong)[::-1], wrong[::-1]
    keep = n_b > 0
    n_b, e_b = n_b[keep], e_b[keep]
    return n_b, e_b, np.cumsum(n_b) - n_b, np.cumsum(e_b) - e_b


def risk_coverage_blocks(levels, right, wrong):
    """The risk–coverage curve at the end of each confidence level. Predictions are ordered by confidence,
    highest first; all predictions of one level are one block, kept or dropped together (a threshold
    cannot split them). After the blocks with confidence ≥ c_b: K_b kept, E_b of them wrong,
        coverage_b = K_b / n,   risk_b = E_b / K_b   (risk = 1 − precision of what is kept)
    Returns [{"confidence", "coverage", "risk", "n"}], highest confidence first."""
    c = np.asarray(levels, dtype=np.float64)
    _, right, wrong = _level_arrays(levels, right, wrong)
    n = (right + wrong).sum()
    out, kept, errors = [], 0.0, 0.0
    for level, r, w in zip(c[::-1].tolist(), right[::-1].tolist(), wrong[::-1].tolist()):
        if r + w == 0:
            continue
        kept, errors = kept + r + w, errors + w
        out.append({"confidence": level, "coverage": kept / n, "risk": errors / kept,
                    "n": int(r + w) if r + w == int(r + w) else r + w})
    return out


def aurc(levels, right, wrong):
    """Area under the risk–coverage curve (Geifman & El-Yaniv 2017), AURC = (1/n) Σ_{k=1..n} risk(k), risk(k)
    = wrong among the k most confident / k, with ties in confidence as one block in random order: inside
    block b (n_b predictions, e_b wrong, s_b = e_b / n_b; K kept and E wrong above it) the (K + j)-th
    prediction has E[wrong so far] = E + j s_b, so
        AURC = (1/n) Σ_b Σ_{j=1..n_b} (E + j s_b) / (K + j) = (1/n) Σ_b [n_b s_b + (E − s_b K)(H_{K+n_b} − H_K)]
    (H: harmonic). This is the mean over every order of the tied predictions, exactly; with no ties it is
    the plain (1/n) Σ_k risk(k). Lower is better; None when n = 0."""
    n_b, e_b, k0, e0 = _blocks(levels, right, wrong)
    n = n_b.sum()
    if n == 0:
        return None
    s = e_b / n_b
    return float((n_b * s + (e0 - s * k0) * (harmonic(k0 + n_b) - harmonic(k0))).sum() / n)


def oracle_aurc(n_right, n_wrong):
    """AURC of the oracle ordering, every right prediction before every wrong one (m = n_right, n = m + n_wrong):
        AURC* = (1/n) Σ_{k=m+1..n} (k − m)/k = (1/n) [(n − m) − m (H_n − H_m)]
    the least AURC any confidence could reach with these predictions. None when n = 0."""
    n = n_right + n_wrong
    if n == 0:
        return None
    return float(((n - n_right) - n_right * (harmonic(n) - harmonic(n_right))) / n)


def excess_aurc(levels, right, wrong):
    """E-AURC = AURC − AURC* (Geifman et al. 2019): the part of AURC due to the ordering, not to the error
    rate itself (0: the confidence ranks every right prediction above every wrong one). None when n = 0."""
    area = aurc(levels, right, wrong)
    return None if area is None else area - oracle_aurc(float(np.sum(right)), float(np.sum(wrong)))


def risk_at_coverage(levels, right, wrong, coverage):
    """Risk at coverage κ: the expected error rate of the k = κ n most confident predictions, ties as one
    block in random order (the block holding the k-th prediction, after K kept with E wrong, is taken in part,
    k − K of its n_b at its rate s_b = e_b / n_b):
        risk(κ) = (E + (k − K) s_b) / k,   K < k ≤ K + n_b
    None when n = 0 or κ = 0."""
    n_b, e_b, k0, e0 = _blocks(levels, right, wrong)
    n = n_b.sum()
    k = coverage * n
    if n == 0 or k <= 0:
        return None
    b = min(int(np.searchsorted(k0 + n_b, k - 1e-9 * n)), len(n_b) - 1)  # first block whose end reaches k
    return float((e0[b] + (k - k0[b]) * e_b[b] / n_b[b]) / k)


def risk_coverage_line(blocks, points_per_block=16):
    """The risk–coverage curve for drawing, from risk_coverage_blocks: inside a block (from coverage κ₀ with
    wrong share e₀ = κ₀ risk₀ of n, to κ₁, e₁) the expected wrong share grows linearly, e(κ) = e₀ + (κ − κ₀)
    (e₁ − e₀)/(κ₁ − κ₀), and risk(κ) = e(κ)/κ: the curve risk_at_coverage follows and aurc integrates.
    Returns ([coverage], [risk]) at points_per_block points per block, each block's end included."""
    xs, ys, k0, e0 = [], [], 0.0, 0.0
    for b in blocks:
        k1, e1 = b["coverage"], b["coverage"] * b["risk"]
        for j in range(1, points_per_block + 1):
            k = k0 + (k1 - k0) * j / points_per_block
            xs.append(k)
            ys.append((e0 + (k - k0) * (e1 - e0) / (k1 - k0)) / k)
        k0, e0 = k1, e1
    return xs, ys


def oracle_risk(coverage, accuracy):
    """Risk at coverage κ of the oracle ordering (every right prediction first), a = the share right:
    risk*(κ) = max(0, κ − a) / κ."""
    return max(0.0, coverage - accuracy) / coverage


def calibration_summary(levels, right, wrong, coverages=RISK_COVERAGES):
    """Every figure of confidence-as-probability for one group of predictions (a dimension, or all pooled):
    n, accuracy, Brier and its decomposition, ECE and MCE (10 bins of c/10, with the rows), AUROC, AURC,
    E-AURC, the risk at fixed coverages and the risk–coverage blocks."""
    _, right_a, wrong_a = _level_arrays(levels, right, wrong)
    n = float(right_a.sum() + wrong_a.sum())
    rows = reliability_from_levels(levels, right, wrong)
    return {"n": int(n), "accuracy": float(right_a.sum() / n) if n else None,
            "brier": brier_score(levels, right, wrong), "murphy": murphy_decomposition(levels, right, wrong),
            "ece": calibration_error(rows), "mce": max_calibration_error(rows),
            "auroc": auroc_from_levels(levels, right, wrong), "aurc": aurc(levels, right, wrong),
            "e_aurc": excess_aurc(levels, right, wrong),
            "risk_at_coverage": {f"{round(100 * k)}%": risk_at_coverage(levels, right, wrong, k) for k in coverages},
            "risk_coverage": risk_coverage_blocks(levels, right, wrong), "reliability": rows}


# -----------------------------------------------------------------------------
# The count table and the bootstrap over users. Every headline number is a function of counts: per
# dimension d, whether the gold is NA (g), the outcome at τ = 0 (o: abstained, wrong, right) and the
# confidence level (l). Each user adds at most one count per dimension, so a user's contribution is
# its row of cell codes, and a bootstrap replicate is the same counting with each user weighted by how
# often it was drawn: the answers are never read again, and memory is that of the Table.

OUTCOMES = 3  # o: 0 abstains at τ = 0 (NA, missing, invalid), 1 non-abstained and wrong, 2 non-abstained and right
HEADLINE = ("f1", "ece", "brier", "auroc", "aurc")  # the numbers that carry intervals (pooled: f1 is avg F1)


@dataclasses.dataclass
class UserCounts:
    """What each user adds to the count table (cell_codes): code and user row of every labelled cell."""
    codes: np.ndarray  # [cells] int64: ((d · 2 + g) · 3 + o) · (L + 1) + l
    users: np.ndarray  # [cells] int64: the user row of each cell
    n_users: int
    n_dims: int
    levels: np.ndarray  # [L] the distinct confidences of the scored cells, ascending (l = L: none)


def cell_codes(table):
    """The Table's labelled (user, dimension) cells as count-table codes:
        code = ((d · 2 + g) · 3 + o) · (L + 1) + l
    g = 1 when the gold is not NA; o = 0 when the prediction abstains at τ = 0 (ŷ = NA, missing or invalid),
    else 1 wrong, 2 right (a non-NA label on gold NA is wrong); l = the index of its confidence among the
    L distinct confidences of the non-abstained cells, L when it states none or abstains."""
    n_users, n_dims = table.gold.shape
    na = np.array([classes.index("NA") for classes in table.classes], dtype=np.int64)
    gold, label = table.gold.astype(np.int64), table.label.astype(np.int64)
    labelled = gold >= 0
    predicted = labelled & (label >= 0) & (label != na)
    outcome = np.where(predicted, 1 + (label == gold), 0)
    scored = predicted & ~np.isnan(table.confidence)
    levels = np.unique(table.confidence[scored])
    level = np.full((n_users, n_dims), len(levels), dtype=np.int64)
    level[scored] = np.searchsorted(levels, table.confidence[scored])
    dim = np.broadcast_to(np.arange(n_dims), (n_users, n_dims))
    code = ((dim * 2 + (gold != na)) * OUTCOMES + outcome) * (len(levels) + 1) + level
    users = np.broadcast_to(np.arange(n_users)[:, None], (n_users, n_dims))
    return UserCounts(code[labelled], users[labelled].copy(), n_users, n_dims, levels)


def count_table(uc, weights=None):
    """counts[d, g, o, l] = Σ_u w_u · #{cells of user u with that code}: w_u = 1 for the data, the number of
    times u was drawn for a bootstrap replicate (a weighted bincount of the codes)."""
    size = uc.n_dims * 2 * OUTCOMES * (len(uc.levels) + 1)
    w = None if weights is None else weights[uc.users]
    return np.bincount(uc.codes, weights=w, minlength=size).reshape(uc.n_dims, 2, OUTCOMES, len(uc.levels) + 1)


def level_counts(counts):
    """(right [L], wrong [L]) per confidence level from a count table's slice [2, 3, L + 1] (one dimension)
    or [D, 2, 3, L + 1] (pooled), the scored cells only."""
    pooled = counts.reshape(-1, 2, OUTCOMES, counts.shape[-1]).sum(axis=(0, 1))
    return pooled[2, :-1], pooled[1, :-1]


def f1_from_counts(counts_d):
    """F1_d at τ = 0 from one dimension's count table [2, 3, L + 1]: non-abstained = Σ counts[:, 1:],
    correct = Σ counts[:, 2], gold non-NA = Σ counts[1] (precision_recall_f1)."""
    return precision_recall_f1(counts_d[:, 2].sum(), counts_d[:, 1:].sum(), counts_d[1].sum())[2]


def avg_f1_from_counts(counts):
    """avg F1 at τ = 0 from a count table [D, 2, 3, L + 1]: (1/D) Σ_d F1_d (f1_from_counts)."""
    return sum(f1_from_counts(counts[d]) for d in range(counts.shape[0])) / counts.shape[0]


def headline_metrics(counts, levels):
    """The headline numbers from a count table [D, 2, 3, L + 1]: an array [D + 1, len(HEADLINE)], one row per
    dimension (F1_d, ECE, Brier, AUROC, AURC of its predictions) and a last, pooled row (avg F1 = the
    mean F1_d; the others over all dimensions' predictions together); NaN where undefined."""
    out = np.full((counts.shape[0] + 1, len(HEADLINE)), np.nan)
    for g in range(counts.shape[0] + 1):
        pooled = g == counts.shape[0]
        right, wrong = level_counts(counts if pooled else counts[g])
        f1 = avg_f1_from_counts(counts) if pooled else f1_from_counts(counts[g])
        values = (f1, calibration_error(reliability_from_levels(levels, right, wrong)),
                  brier_score(levels, right, wrong), auroc_from_levels(levels, right, wrong), aurc(levels, right, wrong))
        out[g] = [np.nan if v is None else v for v in values]
    return out


def bootstrap_weights(rng, n_users):
    """One bootstrap replicate over users: draw n users with replacement; w_u = how often user u was drawn."""
    return np.bincount(rng.integers(0, n_users, n_users), minlength=n_users).astype(np.float64)


def bootstrap_headline(user_counts, replicates=1000, seed=0):
    """Paired bootstrap over users: per replicate one draw of users (bootstrap_weights, from
    numpy.random.default_rng(seed): the same seed, the same replicates) applied to every file's counts, so
    differences between files are paired. user_counts: [UserCounts] over the same users (rows).
    Returns [array [replicates, D + 1, len(HEADLINE)]], one per file."""
    n_users = user_counts[0].n_users
    if any(uc.n_users != n_users for uc in user_counts):
        raise ValueError("bootstrap: the files are not over the same users")
    rng = np.random.default_rng(seed)
    out = [np.empty((replicates, uc.n_dims + 1, len(HEADLINE))) for uc in user_counts]
    for b in range(replicates):
        w = bootstrap_weights(rng, n_users)
        for i, uc in enumerate(user_counts):
            out[i][b] = headline_metrics(count_table(uc, w), uc.levels)
    return out


def percentile_interval(values, level=0.95):
    """Percentile bootstrap interval: the (1 − level)/2 and (1 + level)/2 quantiles of the replicates'
    values (numpy's linear interpolation), replicates where the metric is undefined (NaN) left out;
    (None, None) when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None, None
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _estimate(x):
    return None if x != x else float(x)  # NaN: undefined


def interval_table(estimate, replicates, dims, level=0.95):
    """{"pooled": {metric: {"estimate", "low", "high"}}, "per_dimension": {dim: {...}}} from a headline array
    [D + 1, M] and its replicates [B, D + 1, M]. The pooled "f1" is avg F1."""
    def group(g):
        return {m: dict(zip(("estimate", "low", "high"),
                            (_estimate(estimate[g, k]), *percentile_interval(replicates[:, g, k], level))))
                for k, m in enumerate(HEADLINE)}
    return {"pooled": group(len(dims)), "per_dimension": {d: group(j) for j, d in enumerate(dims)}}


def bootstrap_intervals(table, dims, replicates=1000, seed=0, level=0.95):
    """metrics.json's "intervals": a percentile bootstrap interval over users for each headline number."""
    uc = cell_codes(table)
    boot = bootstrap_headline([uc], replicates, seed)[0]
    return {"method": "percentile bootstrap over users", "replicates": replicates, "seed": seed, "level": level,
            **interval_table(headline_metrics(count_table(uc), uc.levels), boot, dims, level)}


def paired_differences(estimates, replicates, dims, level=0.95):
    """Paired bootstrap of file i against file 0 (the reference), i ≥ 1:
        Δ = metric_i − metric_0 on the data,  interval: percentile_interval of Δ_b = metric_i(b) − metric_0(b)
    over the replicates, both files evaluated on the same resampled users. A Δ whose interval holds 0 is
    one that resampling the users can undo. Returns [{"pooled": {metric: {"delta", "low", "high"}}, ...}]."""
    out = []
    for i in range(1, len(estimates)):
        delta, boot = estimates[i] - estimates[0], replicates[i] - replicates[0]

        def group(g):
            return {m: dict(zip(("delta", "low", "high"),
                                (_estimate(delta[g, k]), *percentile_interval(boot[:, g, k], level))))
                    for k, m in enumerate(HEADLINE)}
        out.append({"pooled": group(len(dims)), "per_dimension": {d: group(j) for j, d in enumerate(dims)}})
    return out


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
            curves[dim].append({"tau": tau, "precision": p, "recall": r, "f1": f1, "n_predicted": n_predicted,
                                 "n_correct": n_correct})
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

    # confidence as a probability of being right, all from the count table (cell_codes): pooled and per dimension
    uc = cell_codes(table)
    counts = count_table(uc)
    pooled = calibration_summary(uc.levels, *level_counts(counts))
    for j, dim in enumerate(dims):
        per_dimension[dim]["calibration"] = calibration_summary(uc.levels, *level_counts(counts[j]))
    right, wrong = level_counts(counts)
    n_scored = pooled["n"]
    answered = ((label, confidence) for j in range(len(dims)) for _, label, confidence in dimension_pairs(table, j)
                if label is not None)
    missing = [uid for uid, has in zip(table.user_ids, table.answered.tolist()) if not has]
    return {
        "avg_f1": sum(per_dimension[d]["f1"] for d in dims) / len(dims),
        "per_dimension": per_dimension,
        "threshold_sweep": threshold_sweep,
        "ece": pooled["ece"],
        "mce": pooled["mce"],
        "brier": pooled["brier"],
        "auroc": pooled["auroc"],
        "aurc": pooled["aurc"],
        "mean_confidence": float((uc.levels * (right + wrong)).sum() / n_scored) if n_scored else None,
        "no_confidence_rate": no_confidence_rate(answered),
        "format_failure_rate": format_failure_rate,
        "n_users": len(table.user_ids),
        "n_missing": len(missing),
        "n_unlabelled": sum(per_dimension[d]["n_unlabelled"] for d in dims),  # (user, dimension) cells left out
        "missing_user_ids": missing[:20],
        "calibration": {k: v for k, v in pooled.items() if k != "reliability"},
        "reliability": pooled["reliability"],
        "confusion": confusion,
        "curves": curves,
    }


# -----------------------------------------------------------------------------
# Thresholds for deployment: per dimension, the τ at which a label is kept (docs/design.md, "Thresholds")


def one_sided_z(level):
    """z = Φ⁻¹(level), the standard normal quantile of a one-sided bound at confidence `level`
    (0.95 -> 1.6449)."""
    return statistics.NormalDist().inv_cdf(level)


def wilson_lower_bound(k, n, z):
    """Wilson score lower bound of a binomial proportion p̂ = k / n:
        L = (p̂ + z²/2n − z·√(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n)
    With z = one_sided_z(0.95) = 1.645 the true proportion is ≥ L with about 95 % confidence. It stays
    inside [0, 1] and is honest for small n and for p̂ = 1 (3 of 3 gives 0.53, not 1). None when n = 0."""
    if n == 0:
        return None
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def levels_searched(curve, taus=TAUS):
    """m, the number of distinct hypotheses the threshold rule tests on one dimension's curve: the
    distinct non-empty kept sets over τ ∈ taus,
        m = #{τ ∈ taus : kept_τ > 0 and (τ is the first of taus or kept_τ ≠ kept_τ')},  τ' = the τ before it
    The kept sets are nested (a higher τ keeps a subset), so equal counts mean the same set, and two τ
    keeping the same labels are one hypothesis, not two."""
    kept = {r["tau"]: r["n_predicted"] for r in curve}
    return sum(1 for i, t in enumerate(taus) if kept[t] > 0 and (i == 0 or kept[t] != kept[taus[i - 1]]))


def bonferroni_z(level, m):
    """The z of a one-sided bound that holds for m hypotheses at once (Bonferroni):
        z = Φ⁻¹(1 − (1 − level) / m)
    each of the m levels is bounded at error (1 − level)/m, so the chance that any of them (and hence the
    one chosen) overstates its precision is at most 1 − level. m = 1 is one_sided_z(level); 0.95 over
    m = 10 levels gives 2.5758, over 3 gives 2.1280."""
    return one_sided_z(1 - (1 - level) / max(m, 1))


def _precision_at(row, z):
    """{precision, precision_lower, recall, n_kept} of one curve row (one τ of one dimension)."""
    return {"precision": row["precision"], "precision_lower": wilson_lower_bound(row["n_correct"], row["n_predicted"], z),
            "recall": row["recall"], "n_kept": row["n_predicted"]}


CORRECTIONS = ("bonferroni", "none")


def choose_threshold(curve, target, level=0.95, correction="bonferroni", taus=TAUS):
    """One dimension's threshold for a target precision, from its labelled curve (evaluate()'s
    curves[dim]: rows {"tau", "n_predicted", "n_correct", "precision", "recall"} for τ = 0..10):
        τ* = min{τ ∈ 1..10 : L(correct_τ, kept_τ; z) ≥ target},  L = wilson_lower_bound
        z = bonferroni_z(level, m), m = levels_searched(curve)   (correction "bonferroni")
        z = one_sided_z(level)                                    (correction "none": per level only)
    the smallest τ (the most recall) whose precision is claimed at the bound's confidence. The rule
    looks at every level and keeps the first that passes, so the bound must hold for all m levels at
    once, or a level that was lucky on the dev set is the one chosen. A label is kept when it is not NA
    and c ≥ τ (abstains), so every prediction of one confidence level is kept or dropped together: τ
    moves in whole levels. Returns {"tau": τ* or None, "claimed", "target", "levels_searched": m, "z",
    precision, precision_lower, recall, n_kept at τ*, "recall_no_threshold": recall at τ = 0}; when no
    τ reaches the target (unreachable): "tau" None and the same figures at "best_tau", the τ with the
    highest lower bound (the smallest such τ on a tie; None when nothing is ever kept)."""
    if correction not in CORRECTIONS:
        raise ConfigError(f"bound_correction: expected one of {list(CORRECTIONS)}, got {correction!r}")
    rows = {r["tau"]: r for r in curve}
    m = levels_searched(curve, taus)
    z = bonferroni_z(level, m) if correction == "bonferroni" else one_sided_z(level)
    bounds = {t: wilson_lower_bound(rows[t]["n_correct"], rows[t]["n_predicted"], z) for t in taus}
    reached = [t for t in taus if bounds[t] is not None and bounds[t] >= target]
    searched = {"levels_searched": m, "z": z}
    if reached:
        return {"tau": reached[0], "claimed": True, "target": target, **searched, **_precision_at(rows[reached[0]], z),
                "recall_no_threshold": rows[0]["recall"]}
    defined = [t for t in taus if bounds[t] is not None]
    best = max(defined, key=lambda t: (bounds[t], -t)) if defined else None
    nothing = {"precision": None, "precision_lower": None, "recall": None, "n_kept": 0}
    return {"tau": None, "claimed": False, "target": target, **searched, "best_tau": best,
            **(_precision_at(rows[best], z) if best is not None else nothing), "recall_no_threshold": rows[0]["recall"]}


def choose_thresholds(curves, targets, level=0.95, correction="bonferroni", taus=TAUS):
    """choose_threshold for every dimension: targets {dim: target precision}."""
    return {dim: choose_threshold(curve, targets[dim], level, correction, taus) for dim, curve in curves.items()}


def coverage_threshold(kept, n_users, coverage, taus=TAUS):
    """Label-free: one dimension's threshold from its confidences alone (precision unknown):
        τ* = min{τ ∈ 1..10 : kept_τ / n ≤ coverage},  kept_τ = #{non-NA answers with c ≥ τ}
    over n users, i.e. keep at most that share of the users, the most confident ones (whole levels:
    ties stand or fall together). τ* = 10 when even τ = 10 keeps more. `kept`: {τ: kept_τ} (count_kept
    over a file). Returns {"tau", "target_coverage", "coverage": kept / n at τ*, "n_kept",
    "n_users", "precision": None}."""
    share = {t: kept[t] / n_users if n_users else 0.0 for t in taus}
    tau = next((t for t in taus if share[t] <= coverage), taus[-1])
    return {"tau": tau, "target_coverage": coverage, "coverage": share[tau], "n_kept": kept[tau], "n_users": n_users,
            "precision": None}


def count_kept(kept, profile, taus=TAUS):
    """Add one profile's answers to kept {dim: {τ: kept_τ}}: an answer counts at each τ where it does
    not abstain (evaluate's abstains rule), so a file is counted one prediction at a time."""
    for dim, counts in kept.items():
        entry = (profile or {}).get(dim)
        if entry is None or abstains(entry["label"], entry["confidence"], 1):
            continue  # kept at no τ >= 1; what is kept at 1 has a confidence c and is kept exactly while c >= τ
        for t in taus:
            counts[t] += entry["confidence"] >= t


def thresholds_applied(curves, taus):
    """What deploying thresholds {dim: τ or None} costs on labelled predictions, per dimension: precision
    and recall at τ (τ None: the dimension abstains everywhere: recall 0, precision undefined), recall
    with no threshold (τ = 0) and the recall cost = R(0) − R(τ)."""
    out = {}
    for dim, curve in curves.items():
        rows, tau = {r["tau"]: r for r in curve}, taus[dim]
        at = rows[tau] if tau is not None else {"precision": None, "recall": 0.0 if rows[0]["recall"] is not None else None,
                                               "n_predicted": 0}
        r0 = rows[0]["recall"]
        out[dim] = {"tau": tau, "precision": at["precision"], "recall": at["recall"], "n_kept": at["n_predicted"],
                    "recall_no_threshold": r0, "recall_cost": None if r0 is None or at["recall"] is None else r0 - at["recall"]}
    return out


THRESHOLDS_NOTE_LABEL_FREE = ("precision unknown: these thresholds come from the confidences alone (no labels); "
                              "they keep at most target_coverage of the users per dimension, the most confident ones")


def read_thresholds(path, taxonomy):
    """A thresholds.json (evaluate.py --target-precision / --target-coverage, or written by hand) ->
    ({dim: τ or None}, the whole document): {"dimensions": {dim: {"tau": integer 0..10 or null}, ...}} with every dimension of
    the taxonomy (τ null: the dimension abstains everywhere; τ 0: every non-NA label is kept). Errors
    name the file and the field."""
    doc = common.read_json(path, "the thresholds.json evaluate.py writes", strict=True)
    dims = doc.get("dimensions") if isinstance(doc, dict) else None
    if not isinstance(dims, dict):
        raise common.DataError(f"{path}: dimensions: expected an object {{dim: {{\"tau\": 0..10 or null}}}}")
    out = {}
    for dim in taxonomy["dimensions"]:
        entry = dims.get(dim)
        if not isinstance(entry, dict) or "tau" not in entry:
            raise common.DataError(f"{path}: dimensions.{dim}: missing; expected {{\"tau\": 0..10 or null}} for every "
                                   f"dimension of the taxonomy")
        tau = entry["tau"]
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int) or not 0 <= tau <= 10):
            raise common.DataError(f"{path}: dimensions.{dim}.tau: expected an integer 0..10 or null, got {tau!r}")
        out[dim] = tau
    unknown = sorted(set(dims) - set(taxonomy["dimensions"]))
    if unknown:
        raise common.DataError(f"{path}: dimensions: {unknown} not in the taxonomy; expected {list(taxonomy['dimensions'])}")
    return out, doc


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
    profiles in memory. oracle: the fast path (main, which streams iter_predictions into a Table) is tested
    against this and evaluate()."""
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
    confidence that is not a number 0..10 (1e9 or -3 would otherwise skew ECE or abstain silently).
    known_ids None: any user_id is taken (label-free thresholds, no evaluation data). A format failure
    is a text that does not parse, or a profile that is null or whose line says "format_ok": false
    (predict.py's lines: the answer behind the profile did not parse)."""
    first_line = {}
    for lineno, where, record in common.iter_jsonl(path, expected="one prediction object per line", strict=True):
        uid = record.get("user_id") if isinstance(record, dict) else None
        if not isinstance(uid, str):
            raise common.DataError(f"{where}: user_id: expected a string, got {uid!r}")
        if known_ids is not None and uid not in known_ids:
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
            yield uid, profile, 1, profile is None or record.get("format_ok") is False
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


def render_report(metrics, title="Evaluation", figures=None):
    """report.md: per-dimension table, the τ sweep, the reliability table, confusion matrices; the
    thresholds chosen (metrics["thresholds"]) or applied (metrics["at_thresholds"]) when there are any;
    `figures` {"pr_curve": file, "reliability": file} embeds those PNGs (paths relative to report.md)."""
    m, figures = metrics, figures or {}
    lines = [f"# {title}", "",
             f"users: {m['n_users']} (missing predictions: {m['n_missing']}); **avg F1 = {_fmt(m['avg_f1'])}**; "
             f"ECE = {_fmt(m['ece'])} (worst bin, MCE = {_fmt(m['mce'])}); Brier = {_fmt(m['brier'])}; "
             f"AUROC = {_fmt(m['auroc'])}; AURC = {_fmt(m['aurc'])}; mean confidence = {_fmt(m['mean_confidence'], 2)}; "
             f"format failure rate = {_fmt(m['format_failure_rate'])}; answers without a confidence = "
             f"{_fmt(m['no_confidence_rate'])}", ""]
    if m["missing_user_ids"]:
        lines += [f"missing (first {len(m['missing_user_ids'])}): {', '.join(m['missing_user_ids'])}", ""]
    if m.get("intervals"):
        lines += [*render_intervals(m["intervals"]), ""]
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
    if "pr_curve" in figures:
        lines += ["", f"![precision and recall against τ, per dimension]({figures['pr_curve']})"]
    if m.get("thresholds"):
        lines += ["", *render_thresholds(m["thresholds"])]
    if m.get("at_thresholds"):
        lines += ["", *render_thresholds_applied(m["at_thresholds"])]
    lines += ["", "## Reliability (non-abstained predictions at τ = 0, all dimensions)", "",
              f"ECE = {_fmt(m['ece'])}, the n-weighted mean of |accuracy − mean c/10|; MCE = {_fmt(m['mce'])}, its "
              "largest (read it with that bin's n).", "",
              "| c/10 bin | n | mean c/10 | accuracy | \\|accuracy − mean c/10\\| |", "|---|---|---|---|---|"]
    for r in m["reliability"]:
        gap = None if r["accuracy"] is None else abs(r["accuracy"] - r["mean_confidence"])
        lines.append(f"| {r['bin']} | {r['n']} | {_fmt(r['mean_confidence'])} | {_fmt(r['accuracy'])} | {_fmt(gap)} |")
    if "reliability" in figures:
        lines += ["", f"![reliability: accuracy per bin of stated confidence, with counts]({figures['reliability']})"]
    lines += ["", *render_calibration(m)]
    if "risk_coverage" in figures:
        lines += ["", f"![risk against coverage, most confident first, with the oracle ordering]({figures['risk_coverage']})"]
    lines += ["", f"## Confusion matrices (rows: gold, columns: predicted; {NO_PREDICTION} = no valid prediction)"]
    for dim, matrix in m["confusion"].items():
        columns = list(next(iter(matrix.values())))
        lines += ["", f"### {dim}", "", "| gold \\ predicted | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for gold, row in matrix.items():
            lines.append(f"| {gold} | " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def render_calibration(m):
    """The confidence-as-probability table of report.md: pooled and per dimension."""
    lines = ["## Confidence as a probability of being right (p = c/10; non-abstained predictions at τ = 0)", "",
             "Brier = REL − RES + UNC (Murphy, one bin per confidence level: exact). Risk–coverage: most confident "
             "first, each confidence level one block (ties kept or dropped together, AURC their mean over orders); "
             "E-AURC = AURC − the oracle ordering's.", "",
             "| group | n | accuracy | Brier | REL | RES | UNC | ECE | MCE | AUROC | AURC | E-AURC | risk@50% | risk@80% |",
             "|---" * 14 + "|"]
    groups = [("all dimensions", m["calibration"])] + [(d, r["calibration"]) for d, r in m["per_dimension"].items()]
    for name, c in groups:
        murphy = c["murphy"] or {}
        risk = c["risk_at_coverage"]
        lines.append(f"| {name} | {c['n']} | {_fmt(c['accuracy'])} | {_fmt(c['brier'])} | "
                     f"{_fmt(murphy.get('reliability'))} | {_fmt(murphy.get('resolution'))} | "
                     f"{_fmt(murphy.get('uncertainty'))} | {_fmt(c['ece'])} | {_fmt(c['mce'])} | {_fmt(c['auroc'])} | "
                     f"{_fmt(c['aurc'])} | {_fmt(c['e_aurc'])} | {_fmt(risk.get('50%'))} | {_fmt(risk.get('80%'))} |")
    return lines


def _with_interval(r, key="estimate", signed=False, digits=3):
    """'x [lo, hi]' of an interval_table / paired_differences entry."""
    f = (lambda x: "—" if x is None else f"{x:+.{digits}f}") if signed else (lambda x: _fmt(x, digits))
    return f"{f(r[key])} [{f(r['low'])}, {f(r['high'])}]"


def render_intervals(doc):
    """metrics["intervals"] as a markdown section: estimate [low, high] per headline number and group."""
    lines = [f"## {doc['level']:.0%} intervals ({doc['method']}, {doc['replicates']} replicates, seed {doc['seed']})", "",
             "| group | F1 (pooled: avg F1) | ECE | Brier | AUROC | AURC |", "|---|---|---|---|---|---|"]
    for name, g in [("all dimensions", doc["pooled"])] + list(doc["per_dimension"].items()):
        lines.append(f"| {name} | " + " | ".join(_with_interval(g[k]) for k in HEADLINE) + " |")
    return lines


def render_thresholds(doc):
    """The thresholds.json just written, as a markdown section."""
    if doc["method"] == "coverage":
        lines = [f"## Thresholds chosen: keep at most {doc['target_coverage']:.0%} of the users per dimension "
                 "(thresholds.json)", "", doc["note"], "", "| dimension | τ | coverage | kept | users |", "|---|---|---|---|---|"]
        for dim, r in doc["dimensions"].items():
            lines.append(f"| {dim} | {r['tau']} | {_fmt(r['coverage'])} | {r['n_kept']} | {r['n_users']} |")
        return lines
    over = " over the levels searched (Bonferroni)" if doc.get("correction") == "bonferroni" else " per level"
    lines = [f"## Thresholds chosen (thresholds.json): smallest τ whose precision's one-sided "
             f"{doc['bound_level']:.0%} Wilson lower bound{over} reaches the target", "",
             "| dimension | target | τ | precision | lower bound | recall | recall at τ = 0 | kept | levels | z |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dim, r in doc["dimensions"].items():
        tau = str(r["tau"]) if r["claimed"] else f"unreachable (best τ = {r['best_tau'] if r['best_tau'] is not None else '—'})"
        lines.append(f"| {dim} | {r['target']:.2f} | {tau} | {_fmt(r['precision'])} | {_fmt(r['precision_lower'])} | "
                     f"{_fmt(r['recall'])} | {_fmt(r['recall_no_threshold'])} | {r['n_kept']} | "
                     f"{r.get('levels_searched', '—')} | {_fmt(r.get('z'))} |")
    return lines


def render_thresholds_applied(applied):
    """thresholds_applied() as a markdown section."""
    lines = [f"## At the thresholds of {applied['path']}", "",
             "| dimension | τ | claimed there | precision | recall | recall at τ = 0 | recall cost | kept |",
             "|---|---|---|---|---|---|---|---|"]
    for dim, r in applied["dimensions"].items():
        claimed = {True: "yes", False: "no", None: "—"}[r.get("claimed")]
        lines.append(f"| {dim} | {'—' if r['tau'] is None else r['tau']} | {claimed} | {_fmt(r['precision'])} | "
                     f"{_fmt(r['recall'])} | {_fmt(r['recall_no_threshold'])} | {_fmt(r['recall_cost'])} | {r['n_kept']} |")
    return lines


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
    data: str = opt("", "users JSONL with gold labels (e.g. test.jsonl); may be left out with --target-coverage only")
    out: str = opt("", "output folder for metrics.json, report.md, pr_curve.csv, the figures, thresholds.json", nonempty=True)
    vote: bool = opt(False, "with samples: the Stage-1 vote of all samples instead of the first")
    weighting: str = opt("confidence", "vote weighting", choices=confprofile.WEIGHTINGS)
    na_weight: float = opt(1.0, "weight of the NA votes (rl.py's na_weight)", min=0)
    taxonomy: str = opt("", "taxonomy JSON (empty: taxonomy.json of the repository)")
    target_precision: float = opt(0.0, "choose per-dimension thresholds reaching this precision -> OUT/thresholds.json "
                                       "(0 = none)", min=0, max=1)
    dimension_targets: dict = opt({}, 'per-dimension precision targets, e.g. {"gender": 0.95}; the other dimensions '
                                      "take --target-precision")
    bound_level: float = opt(0.95, "one-sided confidence level of the Wilson lower bound a claimed precision must "
                                   "reach", gt=0.5, lt=1)
    bound_correction: str = opt("bonferroni", "bonferroni: the bound holds over all the levels searched at once; none: "
                                              "per level only (the smallest τ of several is then optimistic)",
                                choices=CORRECTIONS)
    target_coverage: float = opt(0.0, "label-free thresholds: per dimension the smallest τ that keeps at most this "
                                      "share of the users -> OUT/thresholds.json (0 = none)", min=0, max=1)
    thresholds: str = opt("", "a thresholds.json to apply: precision, recall and the recall cost at its τ per dimension")
    bootstrap: int = opt(1000, "bootstrap replicates over users for the 95 % intervals of the headline numbers "
                               "(0 = none)", min=0)
    seed: int = opt(0, "seed of the bootstrap (the same seed, the same intervals)", min=0)

    def __post_init__(self):
        check_fields(self, "evaluate")
        if self.target_coverage and (self.target_precision or self.dimension_targets):
            raise ConfigError("give either --target-precision / --dimension-targets (labelled) or --target-coverage "
                              "(label-free), not both: each writes thresholds.json")
        if not self.data and not self.target_coverage:
            raise ConfigError("--data: expected the labelled users (only --target-coverage works without labels)")
        if not self.data and self.thresholds:
            raise ConfigError("--thresholds: measuring thresholds needs --data (labelled users)")


def precision_targets(args, dims):
    """{dim: target precision} from --target-precision and --dimension-targets; None when neither is given."""
    if not args.target_precision and not args.dimension_targets:
        return None
    for dim, target in args.dimension_targets.items():
        if dim not in dims:
            raise ConfigError(f"dimension_targets: {dim!r} is not a dimension; expected some of {list(dims)}")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise ConfigError(f"dimension_targets.{dim}: expected a precision in (0, 1], got {target!r}")
    missing = [d for d in dims if d not in args.dimension_targets and not args.target_precision]
    if missing:
        raise ConfigError(f"dimension_targets: no target for {missing}; list them or give --target-precision")
    return {d: float(args.dimension_targets.get(d, args.target_precision)) for d in dims}


def thresholds_document(args, per_dimension):
    """thresholds.json: how the thresholds were chosen, from what, and per dimension τ with its figures."""
    common_keys = {"predictions": args.predictions, "data": args.data or None, "vote": args.vote}
    if args.target_coverage:
        return {"method": "coverage", "rule": "per dimension the smallest τ in 1..10 keeping at most target_coverage of "
                "the users (non-NA answers with confidence ≥ τ)", "note": THRESHOLDS_NOTE_LABEL_FREE,
                "target_coverage": args.target_coverage, **common_keys, "dimensions": per_dimension}
    return {"method": "wilson_lower_bound", "rule": "per dimension the smallest τ in 1..10 whose precision's one-sided "
            "Wilson lower bound reaches the target, at z = Φ⁻¹(1 − (1 − bound_level)/m) over the m levels searched "
            "(correction bonferroni) or z = Φ⁻¹(bound_level) (none); tau null: unreachable, the dimension abstains "
            "everywhere (best_tau: the τ with the highest bound)", "bound_level": args.bound_level,
            "correction": args.bound_correction,
            "target_precision": args.target_precision or None, "dimension_targets": args.dimension_targets,
            **common_keys, "dimensions": per_dimension}


def write_figures(metrics, out):
    """pr_curve.png, reliability.png and risk_coverage.png (pooled and per dimension, with the oracle
    ordering) next to report.md; returns {name: file name} for render_report."""
    plots.save_png(plots.precision_recall_figure(metrics["curves"]), os.path.join(out, "pr_curve.png"))
    plots.save_png(plots.reliability_figure(metrics["reliability"]), os.path.join(out, "reliability.png"))
    figures = {"pr_curve": "pr_curve.png", "reliability": "reliability.png"}
    groups = {"all dimensions": metrics["calibration"],
              **{d: r["calibration"] for d, r in metrics["per_dimension"].items()}}
    blocks = {name: g["risk_coverage"] for name, g in groups.items() if g["risk_coverage"]}
    if blocks:
        accuracy = metrics["calibration"]["accuracy"]
        grid = [i / 100 for i in range(1, 101)]
        oracle = (grid, [oracle_risk(k, accuracy) for k in grid]) if accuracy is not None else None
        fig = plots.risk_coverage_figure({name: risk_coverage_line(b) for name, b in blocks.items()}, blocks, oracle)
        plots.save_png(fig, os.path.join(out, "risk_coverage.png"))
        figures["risk_coverage"] = "risk_coverage.png"
    return figures


def _threshold_summary(doc):
    """One line per run: each dimension's τ (or why none)."""
    parts = []
    for dim, r in doc["dimensions"].items():
        if doc["method"] == "coverage":
            parts.append(f"{dim} τ={r['tau']} (keeps {r['coverage']:.2f})")
        elif r["claimed"]:
            parts.append(f"{dim} τ={r['tau']} (P {r['precision']:.3f} ≥ {r['precision_lower']:.3f})")
        else:
            parts.append(f"{dim} unreachable (best τ={r['best_tau']}: P {_fmt(r['precision'])} ≥ "
                         f"{_fmt(r['precision_lower'])}, R {_fmt(r['recall'])})")
    return "; ".join(parts)


@dataclasses.dataclass
class CompareConfig:
    data: str = opt("", "users JSONL with gold labels, the same for every predictions file", nonempty=True)
    out: str = opt("", "output folder for comparison.json and comparison.md", nonempty=True)
    names: list = opt([], "a name per predictions file, in order (empty: each file's folder, or its name)", items=str)
    vote: bool = opt(False, "with samples: the Stage-1 vote of all samples instead of the first (every file)")
    weighting: str = opt("confidence", "vote weighting", choices=confprofile.WEIGHTINGS)
    na_weight: float = opt(1.0, "weight of the NA votes (rl.py's na_weight)", min=0)
    taxonomy: str = opt("", "taxonomy JSON (empty: taxonomy.json of the repository)")
    bootstrap: int = opt(1000, "paired bootstrap replicates over users", min=1)
    seed: int = opt(0, "seed of the bootstrap (the same seed, the same intervals)", min=0)

    def __post_init__(self):
        check_fields(self, "evaluate compare")


def default_names(paths):
    """A row name per predictions file: its folder's name when the files are all called alike
    (eval/student_sft/predictions.jsonl -> student_sft), else its file name; the path if names collide."""
    names = ([os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
             if len({os.path.basename(p) for p in paths}) == 1 else [os.path.basename(p) for p in paths])
    return names if len(set(names)) == len(names) else list(paths)


def same_users(answered, first, path, first_path, user_ids):
    """Refuse a comparison whose files are not on the same users: the rows each file answered must be equal."""
    differ = np.flatnonzero(answered != first)
    if differ.size:
        uid = user_ids[differ[0]]
        where = first_path if first[differ[0]] else path
        raise common.DataError(f"compare: {path} and {first_path} are not on the same users ({uid!r} is only in "
                               f"{where}; {differ.size} users differ); expected prediction files over the same users")


def prediction_table(path, data, taxonomy, use_vote=False, weighting="confidence", na_weight=1.0):
    """(Table, answers read, format failures) of one predictions file on the labelled users of `data`."""
    users = (u for _, u in confprofile.iter_users(data, require_labels=True, taxonomy=taxonomy))
    table, row_of = gold_table(users, taxonomy)
    n_answers = n_failures = 0
    for uid, profile, answers, failures in iter_predictions(path, taxonomy, row_of, use_vote, weighting, na_weight):
        set_prediction(table, row_of[uid], uid, profile, taxonomy)
        n_answers += answers
        n_failures += failures
    return table, n_answers, n_failures


def compare_main(argv):
    """evaluate.py compare A.jsonl B.jsonl ... --data test.jsonl --out DIR: each file's headline numbers with
    their bootstrap intervals and, for every file after the first, the paired difference from the first
    (paired_differences) -> DIR/comparison.json, DIR/comparison.md. One table per file at a time in memory;
    what the bootstrap keeps of each is its cell codes (cell_codes)."""
    args, files = load_config(CompareConfig, argv, prog="evaluate.py compare",
                              description="Paired comparison of prediction files on the same users:\n  python evaluate.py "
                              "compare A.jsonl B.jsonl [C.jsonl ...] --data test.jsonl --out DIR\neach file after the "
                              "first against the first (Δ = file − A), with 95 % paired-bootstrap intervals over users.")
    if len(files) < 2:
        raise ConfigError(f"compare: expected two or more predictions files, got {len(files)}")
    names = args.names or default_names(files)
    if len(names) != len(files) or len(set(names)) != len(names):
        raise ConfigError(f"--names: expected {len(files)} distinct names (one per file), got {names}")
    taxonomy = confprofile.load_taxonomy(args.taxonomy or None)
    dims = list(taxonomy["dimensions"])
    summaries, user_counts, first = [], [], None
    for path in files:
        table, n_answers, n_failures = prediction_table(path, args.data, taxonomy, args.vote, args.weighting,
                                                        args.na_weight)
        if first is None:
            first = table.answered.copy()
        same_users(table.answered, first, path, files[0], table.user_ids)
        m = metrics_from_table(table, taxonomy, n_failures / n_answers if n_answers else 0.0)
        summaries.append({k: m[k] for k in ("avg_f1", "ece", "mce", "brier", "auroc", "aurc", "mean_confidence",
                                             "format_failure_rate", "n_missing")})
        user_counts.append(cell_codes(table))
        del table
    estimates = [headline_metrics(count_table(uc), uc.levels) for uc in user_counts]
    boot = bootstrap_headline(user_counts, args.bootstrap, args.seed)
    doc = {"method": "paired percentile bootstrap over users", "replicates": args.bootstrap, "seed": args.seed,
           "level": 0.95, "data": args.data, "n_users": user_counts[0].n_users, "vote": args.vote,
           "reference": names[0],
           "files": [{"name": n, "path": p, **s, "intervals": interval_table(e, b, dims)}
                     for n, p, s, e, b in zip(names, files, summaries, estimates, boot)],
           "differences": [{"name": n, "reference": names[0], **d}
                           for n, d in zip(names[1:], paired_differences(estimates, boot, dims))]}
    atomic_write_text(os.path.join(args.out, "comparison.json"), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(os.path.join(args.out, "comparison.md"), render_comparison(doc))
    for d in doc["differences"]:
        print(f"{d['name']} − {d['reference']}: " + "; ".join(
            f"Δ {'avg F1' if k == 'f1' else k} {_with_interval(d['pooled'][k], 'delta', signed=True, digits=4)}"
            for k in HEADLINE))
    print(f"comparison -> {os.path.join(args.out, 'comparison.md')}")
    return doc


def render_comparison(doc):
    """comparison.md: each file's headline numbers with intervals, then each paired Δ against the reference,
    pooled and per dimension."""
    level = f"{doc['level']:.0%}"
    lines = [f"# Paired comparison on {doc['n_users']} users ({doc['data']})", "",
             f"{level} intervals: {doc['method']}, {doc['replicates']} replicates, seed {doc['seed']}; every file is "
             "evaluated on the same resampled users in each replicate. Pooled F1 is avg F1.", "",
             "| file | avg F1 | ECE | Brier | AUROC | AURC | mean conf | missing |", "|---|---|---|---|---|---|---|---|"]
    for f in doc["files"]:
        g = f["intervals"]["pooled"]
        lines.append(f"| {f['name']} | " + " | ".join(_with_interval(g[k]) for k in HEADLINE)
                     + f" | {_fmt(f['mean_confidence'], 2)} | {f['n_missing']} |")
    lines += ["", f"## Paired differences against {doc['reference']} (Δ = file − {doc['reference']}, {level} interval)",
              "", "| file | Δ avg F1 | Δ ECE | Δ Brier | Δ AUROC | Δ AURC |", "|---|---|---|---|---|---|"]
    for d in doc["differences"]:
        lines.append(f"| {d['name']} | " + " | ".join(_with_interval(d["pooled"][k], "delta", True, 4) for k in HEADLINE)
                     + " |")
    for d in doc["differences"]:
        lines += ["", f"### {d['name']} − {d['reference']}, per dimension", "",
                  "| dimension | Δ F1 | Δ ECE | Δ Brier | Δ AUROC | Δ AURC |", "|---|---|---|---|---|---|"]
        for dim, g in d["per_dimension"].items():
            lines.append(f"| {dim} | " + " | ".join(_with_interval(g[k], "delta", True, 4) for k in HEADLINE) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    args, rest = load_config(EvaluateConfig, argv, prog="evaluate.py", description=__doc__.strip().split("\n\n")[0])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --key value (see --help)")
    taxonomy = confprofile.load_taxonomy(args.taxonomy or None)
    dims = list(taxonomy["dimensions"])
    targets = precision_targets(args, dims)
    applied = read_thresholds(args.thresholds, taxonomy) if args.thresholds else None
    # one user or prediction at a time: memory holds the table (a few bytes per user and dimension) and
    # the counts of kept answers per dimension and τ (label-free thresholds)
    table = row_of = None
    if args.data:
        users = (u for _, u in confprofile.iter_users(args.data, require_labels=True, taxonomy=taxonomy))
        table, row_of = gold_table(users, taxonomy)
    kept = {d: dict.fromkeys(TAUS, 0) for d in dims}
    n_predictions = n_answers = n_failures = 0
    for uid, profile, answers, failures in iter_predictions(args.predictions, taxonomy, row_of, args.vote,
                                                            args.weighting, args.na_weight):
        if table is not None:
            set_prediction(table, row_of[uid], uid, profile, taxonomy)
        count_kept(kept, profile)
        n_predictions += 1
        n_answers += answers
        n_failures += failures
    coverage_doc = None
    if args.target_coverage:
        coverage_doc = thresholds_document(args, {d: coverage_threshold(kept[d], n_predictions, args.target_coverage)
                                                  for d in dims})
    if table is None:  # label-free thresholds only
        atomic_write_text(os.path.join(args.out, "thresholds.json"),
                          json.dumps(coverage_doc, indent=2, ensure_ascii=False) + "\n")
        print(f"thresholds -> {os.path.join(args.out, 'thresholds.json')} (precision unknown): "
              f"{_threshold_summary(coverage_doc)}")
        return coverage_doc
    metrics = metrics_from_table(table, taxonomy, n_failures / n_answers if n_answers else 0.0)
    metrics["inputs"] = {"predictions": args.predictions, "data": args.data, "vote": args.vote,
                         "weighting": args.weighting, "na_weight": args.na_weight, "n_answers": n_answers}
    if targets or coverage_doc:
        doc = coverage_doc or thresholds_document(args, choose_thresholds(metrics["curves"], targets, args.bound_level,
                                                                          args.bound_correction))
        atomic_write_text(os.path.join(args.out, "thresholds.json"), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        metrics["thresholds"] = doc
    if applied:
        taus, doc = applied
        at = thresholds_applied(metrics["curves"], taus)
        for dim, r in at.items():
            claimed = (doc["dimensions"].get(dim) or {}).get("claimed")
            r["claimed"] = claimed if isinstance(claimed, bool) else None
        metrics["at_thresholds"] = {"path": args.thresholds, "dimensions": at}
    if args.bootstrap:
        metrics["intervals"] = bootstrap_intervals(table, dims, args.bootstrap, args.seed)
    figures = write_figures(metrics, args.out)
    summary = {k: v for k, v in metrics.items() if k != "curves"}
    atomic_write_text(os.path.join(args.out, "metrics.json"), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(os.path.join(args.out, "report.md"), render_report(metrics, f"Evaluation of {args.predictions}",
                                                                         figures))
    atomic_write_text(os.path.join(args.out, "pr_curve.csv"), render_pr_curve(metrics))
    stale = os.path.join(args.out, "thresholds.json")  # an earlier run's choice, made on other predictions: it must
    if "thresholds" not in metrics and os.path.exists(stale) and not (  # not pass for this run's (unless it is the
            args.thresholds and os.path.samefile(args.thresholds, stale)):  # --thresholds applied here)
        os.unlink(stale)
        print(f"removed {stale}: an earlier run's thresholds, not chosen on these predictions (this run sets no target)")
    sweep = " ".join(f"{r['tau']}:{_fmt(r['precision'], 2)}" for r in metrics["threshold_sweep"])
    print(f"avg_f1 {metrics['avg_f1']:.4f} | ece {_fmt(metrics['ece'])} | mce {_fmt(metrics['mce'])} | "
          f"brier {_fmt(metrics['brier'])} | auroc {_fmt(metrics['auroc'])} | aurc {_fmt(metrics['aurc'])} | "
          f"format failures {metrics['format_failure_rate']:.3f} | missing {metrics['n_missing']} | "
          + (f"unlabelled (user, dim) {metrics['n_unlabelled']} | " if metrics["n_unlabelled"] else "")
          + f"precision@tau {sweep}")
    if metrics.get("thresholds"):
        print(f"thresholds -> {os.path.join(args.out, 'thresholds.json')}: {_threshold_summary(metrics['thresholds'])}")
    if applied:
        print("at " + args.thresholds + ": " + "; ".join(
            f"{d} τ={r['tau']} P {_fmt(r['precision'])} R {_fmt(r['recall'])} (cost {_fmt(r['recall_cost'])})"
            for d, r in metrics["at_thresholds"]["dimensions"].items()))
    return metrics


if __name__ == "__main__":
    run_cli(main, "evaluate.py")
