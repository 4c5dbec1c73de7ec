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

Thresholds for deployment (docs/design.md, "Thresholds"): per dimension the smallest τ in 1..10 whose
precision's one-sided Wilson lower bound L (wilson_lower_bound, 95 % by default, Bonferroni-corrected
over the levels searched: bonferroni_z) reaches a target precision; no such τ: unreachable (the dimension abstains everywhere), reported with its best τ.
Without labels: per dimension the smallest τ that keeps at most a target share of the users
(coverage_threshold; precision unknown). predict.py applies the thresholds.

CLI: python evaluate.py --predictions preds.jsonl --data test.jsonl --out DIR [--vote] [--weighting confidence|majority]
     [--na-weight W] [--target-precision 0.9 [--dimension-targets '{"gender": 0.95}'] [--bound-level 0.95] [--bound-correction bonferroni|none]]
     [--thresholds thresholds.json]
     python evaluate.py --predictions preds.jsonl --out DIR --target-coverage 0.3      (no labels)
A predictions line is {"user_id", "profile": {dim: {"label", "confidence"}}} (predict.py's profiles
too) or {"user_id", "text"} (parsed with confprofile.parse_answer) or {"user_id", "samples": [{"text",
...}, ...]} (the first sample, or with --vote the Stage-1 vote of all samples: label ŷ, confidence =
pooled confidence). Writes DIR/metrics.json, DIR/report.md (embedding DIR/pr_curve.png and
DIR/reliability.png), DIR/pr_curve.csv; with a target, DIR/thresholds.json; with --thresholds, the
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
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise common.DataError(f"{path}: unreadable ({e}); expected the JSON evaluate.py writes") from None
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
    if "pr_curve" in figures:
        lines += ["", f"![precision and recall against τ, per dimension]({figures['pr_curve']})"]
    if m.get("thresholds"):
        lines += ["", *render_thresholds(m["thresholds"])]
    if m.get("at_thresholds"):
        lines += ["", *render_thresholds_applied(m["at_thresholds"])]
    lines += ["", "## Reliability (non-abstained predictions at τ = 0, all dimensions)", "",
              "| c/10 bin | n | mean c/10 | accuracy |", "|---|---|---|---|"]
    for r in m["reliability"]:
        lines.append(f"| {r['bin']} | {r['n']} | {_fmt(r['mean_confidence'])} | {_fmt(r['accuracy'])} |")
    if "reliability" in figures:
        lines += ["", f"![reliability: accuracy per bin of stated confidence, with counts]({figures['reliability']})"]
    lines += ["", f"## Confusion matrices (rows: gold, columns: predicted; {NO_PREDICTION} = no valid prediction)"]
    for dim, matrix in m["confusion"].items():
        columns = list(next(iter(matrix.values())))
        lines += ["", f"### {dim}", "", "| gold \\ predicted | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for gold, row in matrix.items():
            lines.append(f"| {gold} | " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


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
    """pr_curve.png and reliability.png next to report.md; returns {name: file name} for render_report."""
    plots.save_png(plots.precision_recall_figure(metrics["curves"]), os.path.join(out, "pr_curve.png"))
    plots.save_png(plots.reliability_figure(metrics["reliability"]), os.path.join(out, "reliability.png"))
    return {"pr_curve": "pr_curve.png", "reliability": "reliability.png"}


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


def main(argv=None):
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
    print(f"avg_f1 {metrics['avg_f1']:.4f} | ece {_fmt(metrics['ece'])} | auroc {_fmt(metrics['auroc'])} | "
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
