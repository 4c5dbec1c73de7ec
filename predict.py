"""
Profiles for deployment: a trained student (any checkpoint) and users -> one profile per user, where
each dimension keeps its label only where the confidence reaches that dimension's threshold.

    python predict.py --model runs/demo/rl --users users.jsonl --out profiles.jsonl [--thresholds thresholds.json]
        [--samples N --temperature T] [--max-new-tokens M] [--batch-users U] [--force-resume]

Thresholds come from `evaluate.py --target-precision 0.9` on a labelled dev set, or from
`evaluate.py --target-coverage C` without labels (docs/design.md, "Thresholds"). A label is kept when
it is not NA and its confidence c ≥ τ: evaluate.abstains, the rule every metric of evaluate.py uses,
so on labelled users the profiles' precision is exactly evaluate.py's at the same τ. τ null (a target
that was unreachable) abstains everywhere; without --thresholds every non-NA label is kept (τ = 0).

Answers: greedy by default (--samples 1 --temperature 0) through rollout.generate, users batched
(--batch-users per generate() call, packed by its KV-cache budget), each prompt prefilled once and
shared by its samples; a greedy answer writes its confidence as its most probable value 1..10
(--confidence; docs/design.md, "A greedy answer's stated confidence is decoded as a value"). With
--samples N > 1, the Stage-1 vote of the N answers: label ŷ, confidence = the pooled r (0..10),
evidence of the most confident agreeing answer. `--model sim` answers with the
simulated teacher (no weights).

Output, one line per user: {"user_id", "profile": {dim: {"label": a class or "NA", "confidence",
"evidence", "abstained": true when the label is NA, "model_label": the answer's own label (null: no
valid answer)}}, "format_ok"}. evaluate.py reads it as it is. Resumable as teacher labelling is
(label.py): what decides the profiles (checkpoint and its fingerprint, users, taxonomy, thresholds,
sampling) is recorded in <out>.meta.json and a rerun with other settings is refused naming the keys
(unless --force-resume); an --out that is one of the inputs, not a predict.py output, or whose lines
evaluate.py would refuse (a user not in --users, a confidence outside 0..10) is refused before a byte of
it changes; a second run on an --out that a run holds is refused.
The last line printed gives users/s.
"""
import dataclasses
import functools
import time

import torch

import label
import rollout
from common import DEVICE, ConfigError, DataError, check_fields, hold_output, load_config, opt, run_cli
from confprofile import WEIGHTINGS, load_taxonomy, parse_answer, read_users, vote
from evaluate import abstains, checked_profile, read_thresholds

PROFILES = label.OutputKind(("user_id", "profile"), dict, "profiles", "predict.py")


def answer_of(texts, taxonomy, weighting="confidence", na_weight=1.0):
    """The answer behind a profile from a user's N answer texts: {dim: {"label", "confidence", "evidence"}
    | None} and whether any text parsed. One text: parse_answer; more: the Stage-1 vote (confidence =
    pooled r)."""
    parsed = [parse_answer(t, taxonomy) for t in texts]
    format_ok = any(p["format_ok"] for p in parsed)
    if len(parsed) == 1:
        return parsed[0]["dims"], format_ok
    voted = vote(parsed, taxonomy, weighting, na_weight)
    return {d: None if v is None else {"label": v["label"], "confidence": v["pooled_confidence"], "evidence": v["evidence"]}
            for d, v in voted.items()}, format_ok


def check_profiles_line(record, where, known_ids, taxonomy):
    """The content of a profiles line, as evaluate.iter_predictions reads it: user_id one of `known_ids`
    (the users file's), each dimension's label a class and confidence 0..10 or null
    (evaluate.checked_profile), format_ok true or false. A DataError "file:line: field: expected ..."."""
    uid = record.get("user_id")
    if not isinstance(uid, str) or uid not in known_ids:
        raise DataError(f"{where}: user_id: {uid!r} is not one of the users this output profiles; expected a user of "
                        "--users; is --out the output of another users file?")
    checked_profile(record["profile"], taxonomy, where)
    if not isinstance(record.get("format_ok"), bool):
        raise DataError(f"{where}: format_ok: expected true or false, got {record.get('format_ok')!r}")


def read_taus(path, taxonomy):
    """{dim: τ or None} of a thresholds.json (evaluate.read_thresholds reads it strictly: a key repeated
    (the last would win silently), NaN or nesting too deep is one line naming the file)."""
    return read_thresholds(path, taxonomy)[0]


def deployed_profile(answer, taus, taxonomy):
    """Thresholds applied: per dimension keep ŷ iff ŷ ≠ NA and c ≥ τ_d (evaluate.abstains), else "NA".
    answer: {dim: {"label", "confidence", "evidence"} | None}; taus: {dim: τ (0..10) or None (abstain
    everywhere)}, or None for no thresholds (τ = 0: every non-NA label is kept)."""
    out = {}
    for dim in taxonomy["dimensions"]:
        entry = answer.get(dim) or {}
        model_label, confidence = entry.get("label"), entry.get("confidence")
        tau = 0 if taus is None else taus[dim]
        abstained = tau is None or abstains(model_label, confidence, tau)
        out[dim] = {"label": "NA" if abstained else model_label, "confidence": confidence,
                    "evidence": entry.get("evidence"), "abstained": abstained, "model_label": model_label}
    return out


@dataclasses.dataclass
class PredictConfig:
    model: str = opt("", "HF checkpoint dir of the student (or sim: the simulated teacher)", nonempty=True)
    users: str = opt("", "users JSONL to profile", nonempty=True)
    out: str = opt("", "profiles JSONL (resumed when it exists)", nonempty=True)
    thresholds: str = opt("", "thresholds.json from evaluate.py (empty: keep every non-NA label)")
    taxonomy: str = opt("", "taxonomy JSON (empty: taxonomy.json of the repository)")
    samples: int = opt(1, "answers per user; more than 1: their Stage-1 vote", min=1)
    temperature: float = opt(0.0, "0 = greedy", min=0)
    confidence: str = opt("value", "greedy: a stated confidence is its most probable value 1..10, the value nearest "
                                   "its expectation, or read token by token", choices=rollout.CONFIDENCE_DECODING)
    top_k: int = opt(0, "sample from the k most likely tokens (0 = all)", min=0)
    top_p: float = opt(1.0, "nucleus mass to sample from (1 = all)", gt=0, max=1)
    max_new_tokens: int = opt(320, "new tokens per answer at most", min=1)
    seed: int = opt(0, "makes sampled answers reproducible", min=0)
    weighting: str = opt("confidence", "vote weighting with --samples > 1", choices=WEIGHTINGS)
    na_weight: float = opt(1.0, "weight of the NA votes with --samples > 1", min=0)
    batch_users: int = opt(64, "users per generate() call", min=1)
    max_batch_tokens: int = opt(0, "KV-cache slots per batch (0 = 64k on cpu, 128k on cuda)", min=0)
    template_kwargs: dict = opt({}, 'passed to the chat template, e.g. {"enable_thinking": false}')
    device: str = opt("auto", "auto = cuda if available, else cpu", **DEVICE)
    dtype: str = opt("auto", "auto = bfloat16 on cuda, float32 on cpu", choices=("auto", "float32", "bfloat16"))
    progress: bool = opt(True, "a progress bar (on a terminal) or progress lines (in a log)")
    force_resume: bool = opt(False, "resume --out even though <out>.meta.json records other settings")

    def __post_init__(self):
        check_fields(self, "predict")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"

    def sampling(self):
        return rollout.SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p, (),
                                      self.max_batch_tokens, confidence=self.confidence)


def predict_settings(args, taxonomy, taus):
    """What decides the profiles: label.teacher_settings (checkpoint, users, taxonomy, sampling) and
    the thresholds and vote settings; recorded in <out>.meta.json, compared on resume."""
    settings = {**label.teacher_settings(args, taxonomy, model_key="model"), "thresholds": taus}
    if args.samples > 1:  # the vote's settings matter only when there is a vote
        settings.update(weighting=args.weighting, na_weight=args.na_weight)
    return settings


def main(argv=None):
    args, rest = load_config(PredictConfig, argv, prog="predict.py", description=__doc__.strip().split("\n\n")[0])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --key value (see --help)")
    label.refuse_input_as_output(args.out, {"--users": args.users, "--taxonomy": args.taxonomy,
                                            "--thresholds": args.thresholds,
                                            "--model": None if args.model == "sim" else args.model})
    taxonomy = load_taxonomy(args.taxonomy or None)
    taus = read_taus(args.thresholds, taxonomy) if args.thresholds else None
    users = read_users(args.users, taxonomy=taxonomy)
    settings = predict_settings(args, taxonomy, taus)  # names a missing checkpoint or tokenizer
    with hold_output(args.out):  # one run per --out, for the whole run
        predict(args, users, taxonomy, taus, settings)


def predict(args, users, taxonomy, taus, settings):
    """Profile `users` into args.out (resumed when it exists), holding it."""
    batches = [[u["user_id"] for u in b] for b in label.teacher_batches(users, args.batch_users)]
    check = functools.partial(check_profiles_line, known_ids={u["user_id"] for u in users}, taxonomy=taxonomy)
    done = label.open_output(args.out, settings, args.force_resume, PROFILES, batches, check)
    if args.model == "sim":
        model = label.SimulatedTeacher(taxonomy, args.seed, args.temperature)
    else:
        model = label.CheckpointTeacher(args.model, args.sampling(), args.template_kwargs, args.device, args.dtype)

    def to_line(user, samples):
        answer, format_ok = answer_of([text for text, _, _ in samples], taxonomy, args.weighting, args.na_weight)
        return {"user_id": user["user_id"], "profile": deployed_profile(answer, taus, taxonomy), "format_ok": format_ok}

    t0 = time.perf_counter()
    written, n_tokens, _ = label.label_users(model, users, taxonomy, args.out, args.samples, seed=args.seed,
                                          batch_users=args.batch_users, progress=args.progress, done=done,
                                          to_line=to_line, desc="predict")
    seconds = time.perf_counter() - t0
    rate = f", {n_tokens / seconds:.1f} tokens/s" if n_tokens else ""
    print(f"{written} users profiled -> {args.out} in {seconds:.1f} s ({written / max(seconds, 1e-9):.1f} users/s{rate})"
          + (f"; thresholds {args.thresholds}" if args.thresholds else "; no thresholds: every non-NA label kept"))


if __name__ == "__main__":
    run_cli(main, "predict.py")
