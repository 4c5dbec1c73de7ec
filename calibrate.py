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

Memory holds a few numbers per user, not the answers: a first pass votes each teacher line and keeps
only what calibration ranks, a second writes the SFT and audit lines as they come (see build_sft), so
a million users × 8 answers fit in a few hundred MB (docs/benchmarks.md, bench/scale.py).
"""
import array
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile

from common import (ConfigError, DataError, atomic_write_text, atomic_writer, check_fields, dumps_line, iter_jsonl,
                    load_config, opt, read_jsonl_at, run_cli, unwritable_as_data_error)
from confprofile import (TIE_TOLERANCE, dimensions, format_answer, iter_users, load_taxonomy, parse_answer, read_users,
                         render_prompt, vote)

LEVELS = 10
METHODS = ("quantile", "none", "isotonic")

# -----------------------------------------------------------------------------
# Calibration: pure functions of one dimension's pooled confidences.


def calibrate_quantile(values, levels=LEVELS):
    """Quantile calibration: level = 1 + floor(levels · (m − ½) / n), m = the 1-based mid-rank of the
    value among all n values (ascending; tied values share their mid-rank, hence their level).

    Tied means equal up to float rounding: a value within TIE_TOLERANCE (relative, as in the vote) of
    the smallest value of its group joins it, so r = 4/5 computed as 0.8 for one user and as
    0.7999999999999999 for another is one tie. (Distinct pooled confidences of N answers differ by far
    more: r = S_ŷ² / (Σ_k S_k · n) is a ratio of small integers.)

    (m − ½)/n is the Hazen percentile, always in (0, 1), so levels are 1..levels and equally
    frequent for distinct values (n = 20: ranks 1–2 -> 1, 3–4 -> 2, ...). Constant input and n = 1
    give the middle level 1 + levels/2 (6 of 10): no information, no extreme."""
    n = len(values)
    order = sorted(range(n), key=lambda i: values[i])
    out = [0] * n
    start = 0
    while start < n:
        end = start  # [start, end] is one tie group in sorted order
        first = values[order[start]]
        while end + 1 < n and values[order[end + 1]] - first <= TIE_TOLERANCE * max(1.0, abs(first)):
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


def read_samples(path, first_line=None):
    """Yield the records of teacher.jsonl ({"user_id", "samples": [...], ...}) one at a time, validated;
    errors name file:line: field. `first_line` (a dict) is filled as they are read, user_id -> line
    number: the duplicate check, and the record of who was answered. An empty file is an error."""
    first_line = {} if first_line is None else first_line
    n_records = 0
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
        n_records += 1
        yield rec
    if not n_records:
        raise DataError(f"{path}: no teacher records; expected one line per user {{\"user_id\", \"samples\"}}")


def read_dev_labels(path, taxonomy):
    """A labelled dev set for isotonic calibration: JSONL lines with "user_id" and "labels"."""
    return {u["user_id"]: u["labels"] for u in read_users(path, require_labels=True, taxonomy=taxonomy)}


def file_stamp(stat):
    """What says a file is the one read before: (size, modification time in ns) of an os.stat result."""
    return stat.st_size, stat.st_mtime_ns


def index_users(path, taxonomy):
    """({user_id: byte offset of its line}, the file's stamp before it was read) of a users file, every
    record validated (read_users' checks). Pass 2 reads lines back at these offsets: read_user_at checks
    that they still hold what was indexed."""
    stamp = file_stamp(os.stat(path))
    return {u["user_id"]: offset for offset, u in iter_users(path, taxonomy=taxonomy)}, stamp


def read_user_at(f, path, uid, offset, stamp):
    """The user record `uid` read back from the users file `path` (open as `f`) at the byte offset pass 1
    indexed. The file must be the one indexed: the same size and modification time as before pass 1, and
    the line there must be a record of `uid`; else a DataError naming the file (a file rewritten between
    the passes would give every SFT record another user's prompt)."""
    changed = f"{path}: changed while calibrate.py was reading it (%s); expected the users file to stay as it " \
              "was from the first pass to the last: run again on a file that is not being written"
    now = file_stamp(os.fstat(f.fileno()))
    if now != stamp:
        raise DataError(changed % f"size {stamp[0]} -> {now[0]} bytes, modification time {stamp[1]} -> {now[1]} ns")
    try:
        record = read_jsonl_at(f, offset)
    except ValueError:  # invalid UTF-8 or JSON: the offset no longer starts a line
        record = None
    if not isinstance(record, dict) or record.get("user_id") != uid:
        found = record.get("user_id") if isinstance(record, dict) else None
        raise DataError(changed % f"byte {offset} holds {'user_id ' + repr(found) if found else 'no user record'}, "
                                  f"not user_id {uid!r} as when it was indexed")
    return record


def all_dims_valid(parse, dims):
    return all(parse["dims"].get(d) is not None for d in dims)


# -----------------------------------------------------------------------------
# The SFT set, in two passes, so that memory holds a few numbers per user and never the answers:
#   1. vote_samples: each teacher record -> parse, vote. Calibration needs all of a dimension's values
#      at once, so each kept user's voted labels and pooled confidences stay in memory (Votes); its
#      vote details, stored prompt and audit entry go to a spill file, one line per user.
#   2. calibrate_levels, then output_records: the spill file read back line by line -> SFT and audit
#      lines, written as they come (atomically: temp files renamed at the end).


def histogram(levels, n_levels=LEVELS):
    return {str(k): sum(1 for v in levels if v == k) for k in range(1, n_levels + 1)}


@dataclasses.dataclass
class Votes:
    """What pass 1 keeps in memory: the users answered and those left out, counts, and per kept user
    (in teacher order) its id and, per dimension, its voted label and pooled confidence."""
    answered: dict  # user_id -> its line in --samples
    labels: dict  # dim -> [voted label per kept user]
    pooled: dict  # dim -> array('d'): pooled confidence per kept user
    missing_by_dim: dict  # dim -> users without a valid answer there
    kept: list = dataclasses.field(default_factory=list)  # user ids, in teacher order
    dropped: list = dataclasses.field(default_factory=list)  # user ids without a valid answer in some dimension
    n_samples: int = 0
    n_format_ok: int = 0


def vote_samples(path, taxonomy, spill, weighting="confidence", single_answer=False, audit=True):
    """Pass 1 over --samples: parse each answer, vote per dimension; one spill line per user
    {"user_id", "vote": {dim: vote} (kept users), "prompt": the stored prompt (if any), "entry": the
    audit entry so far (with `audit`)}. Returns Votes."""
    dims = dimensions(taxonomy)
    v = Votes(answered={}, labels={d: [] for d in dims}, pooled={d: array.array("d") for d in dims},
              missing_by_dim={d: 0 for d in dims})
    for rec in read_samples(path, v.answered):
        uid = rec["user_id"]
        parses = [parse_answer(s["text"], taxonomy) for s in rec["samples"]]
        v.n_samples += len(parses)
        v.n_format_ok += sum(1 for p in parses if p.get("format_ok"))
        used = parses
        if single_answer:  # the ablation without voting: each user's first answer valid in every dimension
            used = [p for p in parses if all_dims_valid(p, dims)][:1]
        votes = vote(used, taxonomy, weighting)
        line = {"user_id": uid}
        if audit:
            line["entry"] = {"user_id": uid,
                             "answers": [{"format_ok": p.get("format_ok", False),
                                          "dims": {d: (None if p["dims"].get(d) is None else
                                                       [p["dims"][d]["label"], p["dims"][d]["confidence"]])
                                                   for d in dims}} for p in parses]}
        missing = [d for d in dims if votes[d] is None]
        if missing:
            for d in missing:
                v.missing_by_dim[d] += 1
            v.dropped.append(uid)
            if audit:
                line["entry"].update(kept=False, reason=f"no valid answer for {', '.join(missing)}")
        else:
            if audit:
                line["entry"]["kept"] = True
            line["vote"] = votes
            if isinstance(rec.get("messages"), list):  # the prompt the teacher saw, when it was stored
                line["prompt"] = [m for m in rec["messages"] if m.get("role") != "assistant"]
            v.kept.append(uid)
            for d in dims:
                v.labels[d].append(votes[d]["label"])
                v.pooled[d].append(votes[d]["pooled_confidence"])
        spill.write(dumps_line(line))
    if not v.kept:
        raise DataError(f"none of the {len(v.answered)} users has a valid teacher answer in every dimension "
                        f"({', '.join(v.dropped[:5])}{' ...' if len(v.dropped) > 5 else ''}); nothing to train on")
    return v


def calibrate_levels(votes, taxonomy, method="quantile", dev_labels=None, levels=LEVELS):
    """Calibration within each dimension over all kept users: {dim: [level per kept user]}."""
    calibrated = {}
    for d in dimensions(taxonomy):
        values = list(votes.pooled[d])
        if method == "quantile":
            calibrated[d] = calibrate_quantile(values, levels)
        elif method == "none":
            calibrated[d] = calibrate_none(values, levels)
        elif method == "isotonic":
            dev = [(x, label == dev_labels[uid][d])  # labelled in d only
                   for uid, label, x in zip(votes.kept, votes.labels[d], values)
                   if (dev_labels or {}).get(uid, {}).get(d) is not None]
            if not dev:
                raise DataError(f"--dev-labels: no user labelled in {d} is among the kept users of --samples; "
                                "expected user_ids that the teacher answered")
            level_of = fit_isotonic([x for x, _ in dev], [y for _, y in dev], levels)
            calibrated[d] = [level_of(x) for x in values]
        else:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return calibrated


def output_records(spill, calibrated, prompt_of, taxonomy, target="full"):
    """Pass 2: the spill lines of pass 1 -> (SFT record or None, audit entry or None) per user, in
    teacher order. prompt_of(user_id) is the user's prompt when its teacher record stored none."""
    dims = dimensions(taxonomy)
    i = 0  # the next kept user
    for text in spill:
        line = json.loads(text)
        uid, votes, entry = line["user_id"], line.get("vote"), line.get("entry")
        if votes is None:  # left out
            yield None, entry
            continue
        level_by_dim = {d: calibrated[d][i] for d in dims}
        i += 1
        prompt = line["prompt"] if "prompt" in line else prompt_of(uid)
        profile = {d: {"label": votes[d]["label"], "confidence": level_by_dim[d], "evidence": votes[d]["evidence"]}
                   for d in dims}
        answer = format_answer(profile, taxonomy, labels_only=(target == "labels_only"))
        if entry is not None:
            entry["vote"] = {d: {"label": votes[d]["label"], "scores": votes[d]["scores"],
                                 "n_valid": votes[d]["n_valid"],
                                 "pooled_confidence": round(votes[d]["pooled_confidence"], 6),
                                 "calibrated": level_by_dim[d]} for d in dims}
        yield {"user_id": uid, "messages": prompt + [{"role": "assistant", "content": answer}],
               "calibrated": level_by_dim}, entry


def summarize(votes, calibrated, users_index, taxonomy, method, weighting, target, single_answer, levels=LEVELS):
    """The run's summary: users kept, left out and never answered, label distribution, confidence
    histograms before (pooled, rounded) and after calibration."""
    dims = dimensions(taxonomy)
    summary = {
        "method": method, "weighting": weighting, "target": target, "single_answer": single_answer,
        "users_total": len(votes.answered), "users_kept": len(votes.kept),
        "users_without_valid_answer": len(votes.dropped),
        "dropped_user_ids": votes.dropped, "missing_by_dimension": votes.missing_by_dim,
        "users_not_answered": sorted(uid for uid in users_index if uid not in votes.answered),
        "samples_total": votes.n_samples, "samples_format_ok": votes.n_format_ok,
        "label_distribution": {d: {} for d in dims},
        "confidence_histogram_before": {}, "confidence_histogram_after": {},
    }
    for d in dims:
        for label in votes.labels[d]:
            summary["label_distribution"][d][label] = summary["label_distribution"][d].get(label, 0) + 1
        summary["confidence_histogram_before"][d] = histogram(calibrate_none(votes.pooled[d], levels), levels)
        summary["confidence_histogram_after"][d] = histogram(calibrated[d], levels)
    return summary


def build_sft(samples, users, taxonomy, out, audit="", method="quantile", weighting="confidence", target="full",
              single_answer=False, dev_labels="", levels=LEVELS):
    """Vote, calibrate, and write the SFT set `out` (and the audit file `audit`, if given), streaming:
    pass 1 over the teacher file `samples`, calibration, pass 2 over the spill file. `users`: the users
    file the prompts are rendered from ("" when every teacher record stores its prompt); `dev_labels`:
    the labelled dev set file of isotonic calibration. Returns the summary (not written)."""
    folder = os.path.dirname(os.path.abspath(out))
    with unwritable_as_data_error(out):
        os.makedirs(folder, exist_ok=True)
        spill = tempfile.TemporaryFile("w+", encoding="utf-8", dir=folder)  # beside the output: room for it
    with spill:
        votes = vote_samples(samples, taxonomy, spill, weighting, single_answer, audit=bool(audit))
        users_index, users_stamp = index_users(users, taxonomy) if users else ({}, None)
        dev = read_dev_labels(dev_labels, taxonomy) if dev_labels else None
        calibrated = calibrate_levels(votes, taxonomy, method, dev, levels)
        spill.seek(0)
        with open(users or os.devnull, "rb") as users_file, atomic_writer(out) as sft_file, \
                (atomic_writer(audit) if audit else contextlib.nullcontext()) as audit_file:
            def prompt_of(uid):
                if uid not in users_index:
                    raise DataError(f"user_id {uid!r}: not in --users and no stored \"messages\"; expected the users "
                                    "file the teacher labelled")
                return render_prompt(read_user_at(users_file, users, uid, users_index[uid], users_stamp), taxonomy)

            for record, entry in output_records(spill, calibrated, prompt_of, taxonomy, target):
                if record is not None:
                    sft_file.write(dumps_line(record))
                if audit_file is not None:
                    audit_file.write(dumps_line(entry))
    return summarize(votes, calibrated, users_index, taxonomy, method, weighting, target, single_answer, levels)


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
    summary = build_sft(args.samples, args.users, taxonomy, args.out, args.audit, args.method, args.weighting,
                        args.target, args.single_answer, args.dev_labels)
    atomic_write_text(args.out + ".summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run_cli(main, "calibrate.py")
