"""
Stage 1 aggregation: vote the N teacher answers per user, calibrate the pooled confidence, and
write the SFT set (plus an audit trail and a summary).

    python calibrate.py --samples teacher.jsonl --users train.jsonl --out sft.jsonl
        [--method quantile|none|isotonic] [--dev-labels labels.jsonl] [--weighting confidence|majority]
        [--audit audit.jsonl] [--target full|labels_only] [--single-answer]

Per user and dimension (docs/design.md, "Stage 1"): the confidence-weighted vote gives the
pseudo-label ŷ and the pooled confidence r = (S_ŷ / Σ_k S_k) · mean{c_i : y_i = ŷ} (confprofile.vote).
Calibration then maps r to a level 1..10 within each dimension, over all users:

* quantile (default): equal-frequency levels by rank, ties share a level — the calibrated
  confidence is spread evenly over 1..10 and orders users by reliability;
* none: r rounded half up and clamped to 1..10;
* isotonic: P(ŷ correct | r) fitted by pool-adjacent-violators on a small labelled dev set,
  then the level nearest to 10·P.

The SFT target per dimension is ŷ, the calibrated level, and the evidence of the highest-confidence
answer that agrees with ŷ. A user is kept only if every dimension has at least one valid answer;
the others are reported (printed, summary, audit) and left out, so no target is made up, and so are
the users of --users that --samples never answered. An empty --samples, or a run that keeps no
user, is an error: it would write an empty SFT set.
"""
import dataclasses
import json
import math
import os
import sys

from common import (ConfigError, DataError, atomic_write_text, check_fields, iter_jsonl, load_config, opt, run_cli,
                    write_jsonl)
from confprofile import dimensions, format_answer, load_taxonomy, parse_answer, read_users, render_prompt, vote

LEVELS = 10
METHODS = ("quantile", "none", "isotonic")

# -----------------------------------------------------------------------------
# Calibration: pure functions of one dimension's pooled confidences.


def calibrate_quantile(values, levels=LEVELS):
    """Quantile calibration: level = 1 + floor(levels · (m − ½) / n), m = the 1-based mid-rank of the
    value among all n values (ascending; tied values share their mid-rank, hence their level).

    (m − ½)/n is the Hazen percentile, always in (0, 1), so levels are 1..levels and equally
    frequent for distinct values (n = 20: ranks 1–2 -> 1, 3–4 -> 2, ...). Constant input and n = 1
    give the middle level 1 + levels/2 (6 of 10): no information, no extreme."""
    n = len(values)
    order = sorted(range(n), key=lambda i: values[i])
    out = [0] * n
    start = 0
    while start < n:
        end = start  # [start, end] is one tie group in sorted order
        while end + 1 < n and values[order[end + 1]] == values[order[start]]:
            end += 1
        midrank = (start + end) / 2 + 1
        level = min(levels, 1 + math.floor(levels * (midrank - 0.5) / n))
        for j in range(start, end + 1):
            out[order[j]] = level
        start = end + 1
    return out


def calibrate_none(values, levels=LEVELS):
    """No calibration: the pooled confidence rounded half up and clamped to 1..levels."""
    return [min(levels, max(1, math.floor(v + 0.5))) for v in values]


def probability_to_level(p, levels=LEVELS):
    """The level whose c/levels is nearest to the probability p, clamped to 1..levels (round half up)."""
    return min(levels, max(1, math.floor(levels * p + 0.5)))


def isotonic_blocks(values, correct):
    """Isotonic regression by pool-adjacent-violators: P(correct) non-decreasing in the value.

    Equal values are pooled first (a function of r gives one answer per r); then adjacent blocks
    whose means decrease are merged, weighted by size. Returns [(lowest value, mean correct)] ascending."""
    pairs = sorted(zip(values, correct), key=lambda t: t[0])
    blocks = []  # [lowest value, sum correct, count]
    for v, y in pairs:
        if blocks and blocks[-1][3] == v:
            blocks[-1][1] += float(y)
            blocks[-1][2] += 1
        else:
            blocks.append([v, float(y), 1, v])  # [lowest value, sum, count, last value]
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1][1] += last[1]
            blocks[-1][2] += last[2]
            blocks[-1][3] = last[3]
    return [(b[0], b[1] / b[2]) for b in blocks]


def fit_isotonic(values, correct, levels=LEVELS):
    """Fit isotonic calibration on a labelled dev set: r -> P(correct) (a step function; below the
    lowest dev value, the first step) -> level (probability_to_level). Returns the callable r -> level;
    its `.probability` attribute is the callable r -> P(correct) and `.blocks` the fitted steps."""
    if not values:
        raise ValueError("fit_isotonic: needs at least one labelled value")
    blocks = isotonic_blocks(values, correct)

    def probability(r):
        p = blocks[0][1]
        for low, mean in blocks:
            if r >= low:
                p = mean
            else:
                break
        return p

    def level(r):
        return probability_to_level(probability(r), levels)

    level.probability, level.blocks = probability, blocks
    return level


# -----------------------------------------------------------------------------
# Reading teacher samples


def read_samples(path):
    """teacher.jsonl -> [{"user_id", "samples": [...], ...}], validated; errors name file:line: field."""
    records, first_line = [], {}
    for lineno, where, rec in iter_jsonl(path, expected="one teacher record per line"):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object {{\"user_id\", \"samples\"}}")
        uid = rec.get("user_id")
        if not isinstance(uid, str) or not uid:
            raise DataError(f"{where}: user_id: expected a non-empty string, got {uid!r}")
        if uid in first_line:
            raise DataError(f"{where}: user_id: duplicate {uid!r} (first on line {first_line[uid]}); expected one line per user")
        first_line[uid] = lineno
        samples = rec.get("samples")
        if not isinstance(samples, list):
            raise DataError(f"{where}: samples: expected a list of {{\"text\", \"finish_reason\"}}")
        for i, s in enumerate(samples):
            if not isinstance(s, dict) or not isinstance(s.get("text"), str):
                raise DataError(f"{where}: samples[{i}]: expected an object with a string \"text\"")
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no teacher records; expected one line per user {{\"user_id\", \"samples\"}}")
    return records


def read_dev_labels(path, taxonomy):
    """A labelled dev set for isotonic calibration: JSONL lines with "user_id" and "labels"."""
    return {u["user_id"]: u["labels"] for u in read_users(path, require_labels=True, taxonomy=taxonomy)}


def all_dims_valid(parse, dims):
    return all(parse["dims"].get(d) is not None for d in dims)


# -----------------------------------------------------------------------------
# The SFT set


def histogram(levels, n_levels=LEVELS):
    return {str(k): sum(1 for v in levels if v == k) for k in range(1, n_levels + 1)}


def build_sft(teacher, users_by_id, taxonomy, method="quantile", weighting="confidence", target="full",
              single_answer=False, dev_labels=None, levels=LEVELS):
    """Vote, calibrate, and make the SFT records. Returns (sft_records, audit_records, summary)."""
    dims = dimensions(taxonomy)
    voted, audit, dropped, missing_by_dim = [], [], [], {d: 0 for d in dims}
    n_samples = n_format_ok = 0
    for rec in teacher:
        parses = [parse_answer(s["text"], taxonomy) for s in rec["samples"]]
        n_samples += len(parses)
        n_format_ok += sum(1 for p in parses if p.get("format_ok"))
        used = parses
        if single_answer:  # the ablation without voting: each user's first answer valid in every dimension
            used = [p for p in parses if all_dims_valid(p, dims)][:1]
        votes = vote(used, taxonomy, weighting)
        entry = {"user_id": rec["user_id"],
                 "answers": [{"format_ok": p.get("format_ok", False),
                              "dims": {d: (None if p["dims"].get(d) is None else
                                           [p["dims"][d]["label"], p["dims"][d]["confidence"]]) for d in dims}}
                             for p in parses]}
        missing = [d for d in dims if votes[d] is None]
        if missing:
            for d in missing:
                missing_by_dim[d] += 1
            dropped.append(rec["user_id"])
            entry.update(kept=False, reason=f"no valid answer for {', '.join(missing)}")
            audit.append(entry)
            continue
        entry["kept"] = True
        voted.append((rec, votes, entry))
        audit.append(entry)

    if not voted:
        raise DataError(f"none of the {len(teacher)} users has a valid teacher answer in every dimension "
                        f"({', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}); nothing to train on")
    calibrated = {}  # dim -> list of levels, aligned with `voted`
    for d in dims:
        values = [v[d]["pooled_confidence"] for _, v, _ in voted]
        if method == "quantile":
            calibrated[d] = calibrate_quantile(values, levels)
        elif method == "none":
            calibrated[d] = calibrate_none(values, levels)
        elif method == "isotonic":
            dev = [(v[d]["pooled_confidence"], v[d]["label"] == dev_labels[r["user_id"]][d])  # labelled in d only
                   for r, v, _ in voted if (dev_labels or {}).get(r["user_id"], {}).get(d) is not None]
            if not dev:
                raise DataError(f"--dev-labels: no user labelled in {d} is among the kept users of --samples; "
                                "expected user_ids that the teacher answered")
            level_of = fit_isotonic([x for x, _ in dev], [y for _, y in dev], levels)
            calibrated[d] = [level_of(x) for x in values]
        else:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")

    sft = []
    for i, (rec, votes, entry) in enumerate(voted):
        uid = rec["user_id"]
        if isinstance(rec.get("messages"), list):  # the prompt the teacher saw, when it was stored
            prompt = [m for m in rec["messages"] if m.get("role") != "assistant"]
        elif uid in users_by_id:
            prompt = render_prompt(users_by_id[uid], taxonomy)
        else:
            raise DataError(f"user_id {uid!r}: not in --users and no stored \"messages\"; expected the users file the teacher labelled")
        profile = {d: {"label": votes[d]["label"], "confidence": calibrated[d][i], "evidence": votes[d]["evidence"]}
                   for d in dims}
        answer = format_answer(profile, taxonomy, labels_only=(target == "labels_only"))
        level_by_dim = {d: calibrated[d][i] for d in dims}
        sft.append({"user_id": uid, "messages": prompt + [{"role": "assistant", "content": answer}],
                    "calibrated": level_by_dim})
        entry["vote"] = {d: {"label": votes[d]["label"], "scores": votes[d]["scores"], "n_valid": votes[d]["n_valid"],
                             "pooled_confidence": round(votes[d]["pooled_confidence"], 6),
                             "calibrated": level_by_dim[d]} for d in dims}

    summary = {
        "method": method, "weighting": weighting, "target": target, "single_answer": single_answer,
        "users_total": len(teacher), "users_kept": len(sft), "users_without_valid_answer": len(dropped),
        "dropped_user_ids": dropped, "missing_by_dimension": missing_by_dim,
        "users_not_answered": sorted(set(users_by_id) - {r["user_id"] for r in teacher}),
        "samples_total": n_samples, "samples_format_ok": n_format_ok,
        "label_distribution": {d: {} for d in dims},
        "confidence_histogram_before": {}, "confidence_histogram_after": {},
    }
    for d in dims:
        for _, votes, _ in voted:
            label = votes[d]["label"]
            summary["label_distribution"][d][label] = summary["label_distribution"][d].get(label, 0) + 1
        raw = calibrate_none([v[d]["pooled_confidence"] for _, v, _ in voted], levels)
        summary["confidence_histogram_before"][d] = histogram(raw, levels)
        summary["confidence_histogram_after"][d] = histogram(calibrated[d], levels)
    return sft, audit, summary


def print_summary(summary, file=None):
    s, file = summary, file or sys.stdout  # sys.stdout as it is now (a default would freeze it at import)
    print(f"users: {s['users_kept']} kept, {s['users_without_valid_answer']} without a valid answer "
          f"(of {s['users_total']}); samples format_ok {s['samples_format_ok']}/{s['samples_total']}; "
          f"method={s['method']} weighting={s['weighting']} target={s['target']} single_answer={s['single_answer']}", file=file)
    for ids, what in ((s["dropped_user_ids"], "left out, without a valid teacher answer in every dimension"),
                      (s.get("users_not_answered", []), "in --users but not in --samples (never answered)")):
        if ids:
            shown = ", ".join(ids[:10]) + (", ... (all in the summary file)" if len(ids) > 10 else "")
            print(f"{len(ids)} user(s) {what}: {shown}", file=file)
    print(f"{'dimension':<12} {'confidence 1..10 before (rounded pooled) -> after (calibrated)':<60}", file=file)
    for d in s["label_distribution"]:
        before = " ".join(f"{v:>4}" for v in s["confidence_histogram_before"][d].values())
        after = " ".join(f"{v:>4}" for v in s["confidence_histogram_after"][d].values())
        print(f"{d:<12} {before}\n{'':<12} {after}", file=file)
        labels = ", ".join(f"{k}:{v}" for k, v in sorted(s["label_distribution"][d].items(), key=lambda t: -t[1]))
        print(f"{'':<12} labels {labels}", file=file)


@dataclasses.dataclass
class CalibrateConfig:
    samples: str = opt("", "teacher answers: rollout.py's output, {user_id, samples: [{text, finish_reason}]}",
                       nonempty=True)
    users: str = opt("", "the users file the teacher labelled (prompts are rendered from it)")
    out: str = opt("", "the SFT set (JSONL); its summary goes to <out>.summary.json", nonempty=True)
    method: str = opt("quantile", "confidence calibration", choices=METHODS)
    dev_labels: str = opt("", "labelled dev users {user_id, labels}, for --method isotonic")
    weighting: str = opt("confidence", "vote weights", choices=("confidence", "majority"))
    audit: str = opt("", "also write one audit line per user: answers, vote scores, pooled and calibrated confidence")
    target: str = opt("full", "labels_only drops confidence and evidence from the targets (ablation)",
                      choices=("full", "labels_only"))
    single_answer: bool = opt(False, "use each user's first valid answer only (ablation: no vote)")
    taxonomy: str = opt("", "taxonomy JSON (empty: taxonomy.json of the repository)")

    def __post_init__(self):
        check_fields(self, "calibrate")
        if self.method == "isotonic" and not self.dev_labels:
            raise ConfigError("--method isotonic needs --dev-labels (a labelled dev set)")


def main(argv=None):
    args, rest = load_config(CalibrateConfig, argv, prog="calibrate.py", description=__doc__.strip().split("\n\n")[0])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --key value (see --help)")
    inputs = {"--samples": args.samples, "--users": args.users, "--dev-labels": args.dev_labels,
              "--taxonomy": args.taxonomy}
    for flag, out in (("--out", args.out), ("--audit", args.audit)):
        for name, path in inputs.items():  # writing over an input would destroy it
            if out and path and os.path.exists(path) and os.path.exists(out) and os.path.samefile(out, path):
                raise DataError(f"{out}: {flag} is the input {name}; expected a new output file")
    taxonomy = load_taxonomy(args.taxonomy or None)
    teacher = read_samples(args.samples)
    users_by_id = {u["user_id"]: u for u in read_users(args.users, taxonomy=taxonomy)} if args.users else {}
    dev_labels = read_dev_labels(args.dev_labels, taxonomy) if args.dev_labels else None
    sft, audit, summary = build_sft(teacher, users_by_id, taxonomy, args.method, args.weighting, args.target,
                                    args.single_answer, dev_labels)
    write_jsonl(args.out, sft)
    if args.audit:
        write_jsonl(args.audit, audit)
    atomic_write_text(args.out + ".summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run_cli(main, "calibrate.py")
