"""
The whole Conf-Profile pipeline on the embedded default (synthetic world, simulated teacher, tiny
student), every stage through its own script's command line.

    python pipeline.py [--out runs/demo] [--seed S] [--quick] [--ablations [--variants K,K]] [--target-precision P]

world (profilebench.py) -> teacher answers (label.py --teacher sim) -> vote + calibration
(calibrate.py) -> SFT of a tiny from-scratch student (sft.py) -> confidence-guided GRPO (rl.py) ->
greedy answers on the labelled test users (label.py) -> metrics (evaluate.py), and the results
tables (results.md, results.json) with their figures (f1_comparison.png, each evaluation's
pr_curve.png and reliability.png, the SFT and RL training_curves.png). With --target-precision (0.9
by default) the final student's per-dimension thresholds are chosen on a labelled dev world of its
own (predict.py, evaluate.py --target-precision) and applied to the test users (evaluate.py
--thresholds): thresholds/dev/thresholds.json and the recall they cost. Every stage runs through its script's own command line, printed
first, so the run doubles as a tutorial. A stage whose output is complete is skipped (a
`.done/<stage>` marker, written after it succeeded, records the command that made it: another
command into the same --out is refused; and the size and sha256 of the files it wrote and read: if
one changed since, the stage runs again, saying which); SFT and RL resume their own state after a kill.
"""
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

from common import (TEMP_PREFIX, ConfigError, atomic_write_text, check_fields, file_sha256, load_config, opt, read_json,
                    save_config)
from confprofile import ROOT, dimensions, load_taxonomy
from evaluate import mean_defined
from plots import draw_training_curves, f1_comparison_figure, save_png
from rl import RLConfig

DEMO_ROWS = [  # (key, row of the paper-shaped table)
    ("teacher_single", "teacher, one answer"),
    ("teacher_vote", "teacher, vote@8"),
    ("student_init", "student before training"),
    ("student_sft", "after SFT"),
    ("student_rl", "after SFT + RL"),
]
# The component study: each variant is one switch of the normal scripts.
SFT_ABLATIONS = [  # (key, description, calibrate.py flags)
    ("sft_single_answer", "SFT on one teacher answer (no voting)", ["--single-answer"]),
    ("sft_majority", "SFT on a plain majority vote", ["--weighting", "majority"]),
    ("sft_no_calibration", "SFT without calibration", ["--method", "none"]),
    ("sft_labels_only", "SFT on labels only (no confidence / evidence)", ["--target", "labels_only"]),
]
RL_ABLATIONS = [  # (key, description, rl.py flags)
    ("rl_no_filter", "RL without difficulty filter", ["--difficulty", "off"]),
    ("rl_majority", "RL with plain-majority quasi-labels", ["--quasi-label", "majority"]),
    ("rl_no_weighting", "RL without confidence weighting", ["--confidence-weighting", "off"]),
    ("rl_live", "RL with live (unfrozen) confidence", ["--confidence-weighting", "live"]),
    ("rl_sequence_advantage", "RL with one advantage per rollout (plain GRPO)", ["--advantage", "sequence"]),
    ("rl_na_as_class", "RL with NA a full class in the vote (na_weight 1)", ["--na-weight", "1"]),
    ("rl_agreement_weighted", "RL with agreeing answers also weighted by their confidence", ["--agreement", "weighted"]),
    # the label-free RL ideas after the paper, at nominal values (RLCR's lambda 1, a majority share of 1/2, a pool of 2G)
    ("rl_calibration_reward", "RL with RLCR's Brier term, confidence trained (lambda 1, w = 1)",
     ["--calibration-reward", "1", "--confidence-weighting", "off"]),
    ("rl_vote_share_gate", "RL trained only on quasi labels of vote share >= 1/2", ["--min-vote-share", "0.5"]),
    ("rl_vote_pool", "RL with quasi labels voted over 2G rollouts", ["--vote-pool", "16"]),
    ("rl_shuffled_rewards", "control: RL with each group's rewards shuffled (no signal)", ["--shuffle-rewards", "true"]),
]
# The other control: SFT continued from the SFT student for as many updates as RL makes, at RL's learning rate
# and warm-up (the SFT config otherwise): how much of RL's gain more updates alone would give.
SFT_CONTROL = ("sft_continued", "control: SFT continued for RL's number of updates")
VARIANT_KEYS = [key for key, _, _ in SFT_ABLATIONS + RL_ABLATIONS] + [SFT_CONTROL[0]]  # the order of the table


@dataclasses.dataclass
class DemoConfig:
    out: str = opt("runs/demo", "every file of the run goes below this folder", nonempty=True)
    seed: int = opt(0, "world, teacher, SFT and RL seed", min=0)
    quick: bool = opt(False, "a smaller world and fewer steps (a few minutes; the CI end-to-end test)")
    ablations: bool = opt(False, "also run the component study: each variant is one switch of the normal scripts")
    variants: str = opt("", "with --ablations: the comma-separated keys of the variants to run (empty = every one; "
                            "the keys: docs/results.md, 'Ablations')")
    n_train: int = opt(4000, "unlabelled training users", min=1)
    n_test: int = opt(1000, "labelled test users", min=1)
    teacher_samples: int = opt(8, "N: teacher answers per user", min=1)
    sft_config: str = opt("configs/sft_demo.json", "sft.py's config", nonempty=True)
    rl_config: str = opt("configs/rl_demo.json", "rl.py's config", nonempty=True)
    eval_max_new_tokens: int = opt(320, "greedy answer budget of the student at evaluation", min=1)
    procs: int = opt(2, "SFT / RL processes (torchrun, one thread each); 1 = plain python", min=1)
    student_model: str = opt("", "an HF checkpoint dir to train as the student instead of building the tiny "
                             "from-scratch one (with an sft_config whose init_student is false)")
    target_precision: float = opt(0.9, "choose the final student's per-dimension thresholds for this precision on a "
                                       "labelled dev world and apply them to the test users (0 = skip)", min=0, max=1)
    n_dev: int = opt(1000, "labelled dev users (a world of its own, seed + 100) for choosing the thresholds", min=1)
    untrained_row: bool = opt(True, "evaluate the student before training (a row of the table; study.py and "
                                    "budget.py go without it)")

    def __post_init__(self):
        check_fields(self, "demo config")
        named = self._named_variants()
        unknown = [k for k in named if k not in VARIANT_KEYS]
        if unknown:
            raise ConfigError(f"demo config: variants: unknown {', '.join(map(repr, unknown))}; expected keys among "
                              f"{', '.join(VARIANT_KEYS)}")
        if named and not self.ablations:
            raise ConfigError("demo config: variants: only with --ablations (it picks which variants that runs)")

    def _named_variants(self):
        return [k.strip() for k in self.variants.split(",") if k.strip()]

    def variant_keys(self):
        """The variants --ablations runs, in the table's order: every one unless `variants` names some."""
        named = self._named_variants()
        return [k for k in VARIANT_KEYS if not named or k in named]


# --quick: what changes (everything else is the default run)
QUICK = {"n_train": 400, "n_test": 200, "n_dev": 200}
F1_FIGURE_ROWS = ("teacher_single", "teacher_vote", "student_sft", "student_rl")  # the rows f1_comparison.png compares
DEV_SEED_OFFSET = 100  # the dev world's seed: seed + 100, a world of its own
QUICK_SFT = ["--max-steps", "60", "--eval-every", "30"]
QUICK_RL = ["--max-steps", "3"]


def run_stage(name, argv, out, log, done=True):
    """Run `python argv...` as its own process unless out/.done/<name> says it already finished.

    The marker records what made the stage's output: its command line (without --resume, which only
    says how it ran) and the sha256 of each --config file it read. A finished stage is skipped only if
    both are the same now; otherwise this raises ConfigError naming what differs, since skipping would
    report the old run's numbers under the new settings, and rerunning one stage would mix two runs in
    one folder (a fresh --out is the way to run with other settings). The marker also records the
    fingerprints of the files the stage wrote and read (_stage_files, _fingerprints): when one of them
    changed since (a teacher file cut to half its users, a checkpoint replaced, an earlier stage redone
    with another result), the stage is not skipped but runs again (the teacher file resumes), after one
    line saying which file changed."""
    marker = os.path.join(out, ".done", name)
    torchrun = argv[0] == "torchrun"  # argv = ["torchrun", "--standalone", "--nproc_per_node=K", script, ...] or [script, ...]
    shown = ("" if torchrun else "python ") + " ".join(_quote(a) for a in argv)
    made_by = _stage_record(argv)
    if done and os.path.exists(marker):
        try:
            recorded = _read_json(marker)
        except ValueError:
            recorded = None
        changes = _stage_changes(recorded, made_by)
        if changes:
            raise ConfigError(f"stage {name}: {out} holds its output from another command ({'; '.join(changes)}); "
                              f"use a fresh --out to run with these settings (or delete {marker} and the stage's "
                              "output to redo it)")
        damage = _file_changes(recorded, argv, out)
        if not damage:
            print(f"[skip] {name}: finished earlier ({marker})", flush=True)
            seconds = recorded.get("seconds")  # what the stage took when it ran
            log.append({"stage": name, "command": shown, "seconds": seconds if isinstance(seconds, (int, float)) else None,
                        "skipped": True})
            return
        print(f"[redo] {name}: {damage} since it finished; running it again", flush=True)
        os.unlink(marker)
    print(f"\n=== {name}\n$ {shown}", flush=True)
    t0 = time.time()
    argv = [str(a) for a in argv]
    prefix, env = [sys.executable], None
    if torchrun:  # `python -m torch.distributed.run` is what the torchrun command runs; one thread per process
        n = next(i for i, a in enumerate(argv) if i and not a.startswith("--"))  # torchrun's options end at the script
        prefix, argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:n]], argv[n:]
        env = dict(os.environ, OMP_NUM_THREADS="1")
    script = argv[0] if os.path.exists(argv[0]) else os.path.join(ROOT, argv[0])  # run from any folder
    subprocess.run(prefix + [script] + argv[1:], check=True, env=env)
    seconds = time.time() - t0
    print(f"[done] {name} in {seconds:.0f}s", flush=True)
    log.append({"stage": name, "command": shown, "seconds": round(seconds, 1)})
    if done:
        outputs, inputs = _stage_files(argv, out)
        atomic_write_text(marker, json.dumps({"command": shown, **made_by, "seconds": round(seconds, 1),
                                              "outputs": _fingerprints(outputs), "inputs": _fingerprints(inputs)},
                                             ensure_ascii=False) + "\n")


OUTPUT_FLAGS = ("--out", "--output-dir", "--audit")  # what a stage's script writes: the file or folder after them


def _stage_files(argv, out):
    """(outputs, inputs) of a stage's command line: the paths after its OUTPUT_FLAGS, and the other
    arguments that name an existing file or folder inside the run folder `out` (what earlier stages wrote:
    the world, the teacher answers, the SFT set, checkpoints), less those inside an output."""
    args = [str(a) for a in argv]
    outputs = [v for flag, v in zip(args, args[1:]) if flag in OUTPUT_FLAGS]
    inside = lambda path, folder: os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)
    inputs = [a for a in args[1:] if not a.startswith("--") and a not in outputs and os.path.exists(a)
              and inside(a, out) and not any(a == o or inside(a, o) for o in outputs)]
    return outputs, inputs


def _fingerprints(paths):
    """{file: {"size", "sha256"}} of the files that make up `paths`: a file, with the files beside it named
    after it (sft.jsonl.summary.json, teacher_test.jsonl.meta.json); a folder, every file under it. Left
    out: the figures (*.png; the pipeline redraws the training curves into finished run folders) and
    the temp files of atomic writes."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
        elif os.path.isfile(path):
            folder, base = os.path.split(path)
            files += [path] + [os.path.join(folder, f) for f in os.listdir(folder or ".") if f.startswith(base + ".")]
    return {f: {"size": os.path.getsize(f), "sha256": file_sha256(f)} for f in sorted(set(files))
            if not f.endswith(".png") and not os.path.basename(f).startswith(TEMP_PREFIX)}


def _file_changes(recorded, argv, out):
    """Why a finished stage's files are not the ones its marker recorded ("" when they are): an output
    changed, cut, or gone since the stage wrote it, or an input that an earlier stage has written again
    since this one read it. A marker that records no files cannot vouch for them."""
    if not isinstance(recorded.get("outputs"), dict) or not isinstance(recorded.get("inputs"), dict):
        return "its marker records no fingerprints of its files (an older marker)"
    outputs, inputs = _stage_files(argv, out)
    changes = []
    for kind, paths in (("output", outputs), ("input", inputs)):
        was, now = recorded[kind + "s"], _fingerprints(paths)
        for f, fp in was.items():
            if f not in now:
                changes.append(f"its {kind} {f} is gone")
            elif now[f] != fp:
                size = f"{fp.get('size')} -> {now[f]['size']} bytes" if fp.get("size") != now[f]["size"] else "same size"
                changes.append(f"its {kind} {f} changed ({size}, sha256 {str(fp.get('sha256'))[:12]} -> "
                               f"{now[f]['sha256'][:12]})")
        changes += [f"its {kind} {f} is new" for f in now if f not in was and kind == "input"]
    return "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")


def _stage_record(argv):
    """What decides a stage's output: {"argv": its command line without --resume and --overwrite (how it
    ran, not what it computes), "config_sha256": {path: sha256} of the files given to --config}."""
    args = [str(a) for a in argv if str(a) not in ("--resume", "--overwrite")]
    configs = {path: file_sha256(path) for flag, path in zip(args, args[1:]) if flag == "--config" and os.path.isfile(path)}
    return {"argv": args, "config_sha256": configs}


def _stage_changes(recorded, made_by):
    """How a stage's recorded command differs from this one: ["--seed 0 -> 1", ...]; [] when it is the same."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("argv"), list):
        return ["its marker records no command line to compare (an older version, or damaged)"]
    old, new = _flags(recorded["argv"]), _flags(made_by["argv"])
    changes = [f"{k} {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in sorted(set(old) | set(new), key=str)
               if old.get(k) != new.get(k)]
    for path, sha in made_by["config_sha256"].items():
        was = (recorded.get("config_sha256") or {}).get(path)
        if was != sha:
            changes.append(f"{path} changed since (sha256 {str(was)[:12]} -> {sha[:12]})")
    return changes


def _flags(args):
    """A command line as {flag: value} ("--flag" alone -> "(set)"; what no flag names -> {position: arg})."""
    out, i = {}, 0
    while i < len(args):
        if args[i].startswith("--") and "=" in args[i]:
            key, value = args[i].split("=", 1)
            out[key], i = value, i + 1
        elif args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]], i = args[i + 1], i + 2
        elif args[i].startswith("--"):
            out[args[i]], i = "(set)", i + 1
        else:
            out[f"argument {i + 1}"], i = args[i], i + 1
    return out


def resume_flags(run_dir):
    """["--resume"] when sft.py / rl.py left a checkpoint in run_dir (killed before the end); ["--overwrite"]
    when run_dir holds a finished run (a stage being redone: its marker is gone or its files changed; a
    skipped stage never runs); else []."""
    if os.path.isdir(os.path.join(run_dir, "train_state")):
        return ["--resume"]
    return ["--overwrite"] if os.path.isfile(os.path.join(run_dir, "config.json")) else []


def _quote(arg):
    return shlex.quote(str(arg))


def _read_json(path):
    return read_json(path)


def _pct(x, digits=1):
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _mean_pr(metrics, taxonomy):
    per = metrics["per_dimension"]
    dims = dimensions(taxonomy)  # precision is undefined (None) for a dimension where nothing was predicted
    return mean_defined(per[d]["precision"] for d in dims), mean_defined(per[d]["recall"] for d in dims)


def _interval(m, key, scale=1.0, digits=3):
    """' [low, high]' of metrics["intervals"]["pooled"][key] (evaluate.py's bootstrap), '' without one."""
    r = (m.get("intervals") or {}).get("pooled", {}).get(key)
    if not r or r["low"] is None:
        return ""
    return f" [{scale * r['low']:.{digits}f}, {scale * r['high']:.{digits}f}]"


def _num(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def results_table(rows, taxonomy):
    """Markdown, the paper's shape: F1 per dimension, average F1, P / R at tau=0, ECE, mean confidence;
    avg F1 and ECE with their 95 % bootstrap interval over the test users."""
    dims = dimensions(taxonomy)
    lines = ["| row | " + " | ".join(dims) + " | **avg F1** [95% CI] | P | R | ECE [95% CI] | mean conf |",
             "|---" * (len(dims) + 6) + "|"]
    for name, m in rows:
        p, r = _mean_pr(m, taxonomy)
        cells = [_pct(m["per_dimension"][d]["f1"]) for d in dims]
        conf, ece = m.get("mean_confidence"), m.get("ece")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{_pct(m['avg_f1'], 2)}**{_interval(m, 'f1', 100, 2)} | "
                     f"{_pct(p)} | {_pct(r)} | {_num(ece)}{_interval(m, 'ece')} | {_num(conf, 2)} |")
    return "\n".join(lines)


def calibration_table(rows):
    """Markdown: confidence as a probability of being right (p = c/10, non-abstained at τ = 0, all dimensions):
    Brier and its decomposition, ECE beside the worst bin (MCE), AUROC, AURC, E-AURC, risk at 50 % / 80 %
    coverage; Brier, AUROC and AURC with their 95 % bootstrap interval over the test users."""
    lines = ["| row | n | Brier [95% CI] | REL | RES | UNC | MCE | AUROC [95% CI] | AURC [95% CI] | E-AURC | "
             "risk@50% | risk@80% |", "|---" * 12 + "|"]
    for name, m in rows:
        c = m.get("calibration") or {}
        murphy, risk = c.get("murphy") or {}, c.get("risk_at_coverage") or {}
        lines.append(f"| {name} | {c.get('n', '-')} | {_num(c.get('brier'))}{_interval(m, 'brier')} | "
                     f"{_num(murphy.get('reliability'))} | {_num(murphy.get('resolution'))} | "
                     f"{_num(murphy.get('uncertainty'))} | {_num(c.get('mce'))} | {_num(c.get('auroc'))}"
                     f"{_interval(m, 'auroc')} | {_num(c.get('aurc'))}{_interval(m, 'aurc')} | {_num(c.get('e_aurc'))} | "
                     f"{_num(risk.get('50%'))} | {_num(risk.get('80%'))} |")
    return "\n".join(lines)


def _delta(d, key, scale=1.0, digits=3):
    """'Δ [low, high]' of a paired difference (evaluate.py compare)."""
    r = d["pooled"][key]
    if r["delta"] is None:
        return "-"
    low = "-" if r["low"] is None else f"{scale * r['low']:+.{digits}f}"
    high = "-" if r["high"] is None else f"{scale * r['high']:+.{digits}f}"
    return f"{scale * r['delta']:+.{digits}f} [{low}, {high}]"


def paired_table(doc, names):
    """Markdown: each paired difference of evaluate.py compare (file − the reference), avg F1 in points,
    with its 95 % paired-bootstrap interval over the same test users."""
    lines = ["| compared | Δ avg F1 (points) | Δ ECE | Δ Brier | Δ AUROC | Δ AURC |", "|---|---|---|---|---|---|"]
    for d in doc["differences"]:
        lines.append(f"| {names.get(d['name'], d['name'])} − {names.get(d['reference'], d['reference'])} | "
                     f"{_delta(d, 'f1', 100, 2)} | {_delta(d, 'ece')} | {_delta(d, 'brier')} | {_delta(d, 'auroc')} | "
                     f"{_delta(d, 'aurc')} |")
    return "\n".join(lines)


def sweep_table(rows):
    """Precision / recall (means over dimensions, %) at each confidence threshold tau = 1..10."""
    taus = [s["tau"] for s in rows[0][1]["threshold_sweep"]]
    lines = ["| row | " + " | ".join(f"τ={t}" for t in taus) + " |", "|---" * (len(taus) + 1) + "|"]
    for name, m in rows:
        cells = [f"{_pct(s['precision'], 0)}/{_pct(s['recall'], 0)}" for s in m["threshold_sweep"]]
        lines.append(f"| {name} (P/R) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def thresholds_table(doc, applied):
    """Per dimension: τ chosen on dev (or unreachable: then the dev figures are the best τ's, and the
    dimension abstains on test), its dev precision and lower bound, and on the test users the precision,
    the recall and its cost (recall at τ = 0 minus recall at τ)."""
    lines = ["| dimension | τ (dev) | dev precision | dev lower bound | test precision | test recall | "
             "recall at τ = 0 | recall cost |", "|---" * 8 + "|"]
    for dim, d in doc["dimensions"].items():
        t = applied["dimensions"][dim]
        best = f" (best τ {d['best_tau']})" if d.get("best_tau") is not None else ""
        tau = str(d["tau"]) if d["claimed"] else "unreachable" + best
        dev_p, dev_l = _pct(d["precision"]), _pct(d["precision_lower"])
        lines.append(f"| {dim} | {tau} | {dev_p} | {dev_l} | {_pct(t['precision'])} | {_pct(t['recall'])} | "
                     f"{_pct(t['recall_no_threshold'])} | {_pct(t['recall_cost'])} |")
    return "\n".join(lines)


def _rl_budget(rl_config, rl_extra):
    """sft.py flags for the continued-SFT control: RL's number of updates (max_steps x num_iterations), its lr
    and warm-up, as rl.py itself resolves them from its config file and the pipeline's own rl.py flags
    (--quick's --max-steps), defaults included."""
    rl, _ = load_config(RLConfig, ["--config", rl_config, *map(str, rl_extra)], prog="rl.py")
    return ["--max-steps", rl.max_steps * rl.num_iterations, "--lr", rl.lr, "--warmup-steps", rl.warmup_steps]


def predict_and_evaluate(key, model_dir, cfg, world, out, log, max_new_tokens=None):
    """Greedy answers of a checkpoint on the test users (label.py), then evaluate.py; returns metrics."""
    eval_dir = os.path.join(out, "eval", key)
    preds = os.path.join(eval_dir, "predictions.jsonl")
    run_stage(f"predict_{key}", ["label.py", "--teacher", model_dir, "--users", f"{world}/test.jsonl", "--samples", "1",
                                 "--temperature", "0", "--max-new-tokens", max_new_tokens or cfg.eval_max_new_tokens,
                                 "--out", preds], out, log)
    run_stage(f"evaluate_{key}", ["evaluate.py", "--predictions", preds, "--data", f"{world}/test.jsonl", "--out", eval_dir],
              out, log)
    return _read_json(os.path.join(eval_dir, "metrics.json"))


def run_demo(cfg):
    """The whole Conf-Profile pipeline on the synthetic world; writes results.md / results.json."""
    t_start = time.time()
    if cfg.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    out, seed, log = cfg.out, str(cfg.seed), []
    os.makedirs(out, exist_ok=True)
    save_config(cfg, out, "demo_config.json")
    # A tiny model's matmuls do not split well over threads: on 2 cores, 2 data-parallel processes of
    # one thread each train faster than one process with 2 threads.
    # --standalone: torchrun picks a free port, so two demos (or a demo and the tests) can run at once.
    launch = ["torchrun", "--standalone", f"--nproc_per_node={cfg.procs}"] if cfg.procs > 1 else []
    taxonomy = load_taxonomy()
    for key in ("sft_config", "rl_config"):  # configs/ of the repository unless the path exists as given
        path = getattr(cfg, key)  # absolute either way: the stages' recorded commands do not depend on the cwd
        setattr(cfg, key, os.path.abspath(path if os.path.exists(path) else os.path.join(ROOT, path)))
    world = os.path.join(out, "world")
    sft_dir, rl_dir, init_dir = (os.path.join(out, d) for d in ("sft", "rl", "student_init"))
    init_dir = cfg.student_model or init_dir
    sft_extra = QUICK_SFT if cfg.quick else []
    rl_extra = QUICK_RL if cfg.quick else []

    # Stage 0: the synthetic world (users with hidden attributes; labels only for the test users).
    run_stage("world", ["profilebench.py", "--out", world, "--n-train", cfg.n_train, "--n-test", cfg.n_test, "--seed", seed],
              out, log)
    # Stage 1a: the (simulated) teacher answers every user N times; the test answers give the teacher rows.
    for split in ("train", "test"):
        run_stage(f"teacher_{split}", ["label.py", "--teacher", "sim", "--users", f"{world}/{split}.jsonl", "--samples",
                                       cfg.teacher_samples, "--seed", seed, "--out", f"{out}/teacher_{split}.jsonl"], out, log)
    rows = {}
    for key, extra in (("teacher_single", []), ("teacher_vote", ["--vote"])):
        eval_dir = os.path.join(out, "eval", key)
        run_stage(f"evaluate_{key}", ["evaluate.py", "--predictions", f"{out}/teacher_test.jsonl", "--data",
                                      f"{world}/test.jsonl", "--out", eval_dir, *extra], out, log)
        rows[key] = _read_json(os.path.join(eval_dir, "metrics.json"))
    # Stage 1b: vote + calibrate into the SFT set; Stage 1c: build the tiny student and distil.
    run_stage("calibrate", ["calibrate.py", "--samples", f"{out}/teacher_train.jsonl", "--users", f"{world}/train.jsonl",
                            "--out", f"{out}/sft.jsonl", "--audit", f"{out}/audit.jsonl"], out, log)

    def sft_stage(name, data, run_dir):  # the main SFT run and each SFT ablation differ only in data and folder
        run_stage(name, [*launch, "sft.py", "--config", cfg.sft_config, "--model", init_dir, "--data", data, "--seed", seed,
                         *sft_extra, "--output-dir", run_dir, *resume_flags(run_dir)], out, log)

    sft_stage("sft", f"{out}/sft.jsonl", sft_dir)
    # The untrained tiny student never stops and never writes a valid answer: 64 tokens show that as well as
    # 320. A pretrained student may answer before training: it gets the full budget.
    if cfg.untrained_row:
        rows["student_init"] = predict_and_evaluate("student_init", init_dir, cfg, world, out, log,
                                                    max_new_tokens=None if cfg.student_model else 64)
    rows["student_sft"] = predict_and_evaluate("student_sft", sft_dir, cfg, world, out, log)
    # Stage 2: confidence-guided GRPO from the SFT student, on the unlabelled train users.
    rl_common = ["--config", cfg.rl_config, "--model", sft_dir, "--data", f"{world}/train.jsonl", "--stage1",
                 f"{out}/sft.jsonl", "--seed", seed, *rl_extra]
    run_stage("rl", [*launch, "rl.py", *rl_common, "--output-dir", rl_dir, *resume_flags(rl_dir)], out, log)
    rows["student_rl"] = predict_and_evaluate("student_rl", rl_dir, cfg, world, out, log)

    # Is RL above SFT? The paired bootstrap over the same test users (evaluate.py compare).
    compare_dir = os.path.join(out, "eval", "compare_rl_sft")
    run_stage("compare_rl_sft", ["evaluate.py", "compare", f"{out}/eval/student_sft/predictions.jsonl",
                                 f"{out}/eval/student_rl/predictions.jsonl", "--data", f"{world}/test.jsonl",
                                 "--out", compare_dir], out, log)
    rl_vs_sft = _read_json(os.path.join(compare_dir, "comparison.json"))
    named = [(name, rows[key]) for key, name in DEMO_ROWS if key in rows]
    students = [(name, rows[key]) for key, name in DEMO_ROWS if key.startswith("student_") and key in rows]
    results = {"config": dataclasses.asdict(cfg), "rows": {key: rows[key] for key, _ in DEMO_ROWS if key in rows},
               "stages": log, "comparisons": {"rl_vs_sft": rl_vs_sft}}
    save_png(f1_comparison_figure([(name, rows[key]) for key, name in DEMO_ROWS if key in F1_FIGURE_ROWS],
                                  dimensions(taxonomy)), os.path.join(out, "f1_comparison.png"))
    for run_dir in (sft_dir, rl_dir):  # sft.py / rl.py draw them at the end; a run made before they did gets them here
        draw_training_curves(run_dir)
    md = ["# Conf-Profile on the synthetic ProfileBench world", "",
          f"{cfg.n_test} test users, seed {cfg.seed}{' (--quick)' if cfg.quick else ''}. F1 / P / R in %, at τ = 0.", "",
          results_table(named, taxonomy), "", "![F1 per dimension and average F1 of each row](f1_comparison.png)", "",
          "## Confidence as a probability of being right (p = c/10; all dimensions)", "",
          "95 % intervals: percentile bootstrap over the test users (evaluate.py, 1000 replicates, seed 0).", "",
          calibration_table(named), "",
          "![risk against coverage after SFT + RL](eval/student_rl/risk_coverage.png)", "",
          "## SFT + RL against SFT (paired bootstrap over the same test users)", "",
          paired_table(rl_vs_sft, {"student_sft": "after SFT", "student_rl": "after SFT + RL"}), "",
          "## Precision / recall over the confidence threshold τ", "",
          sweep_table(students), "", "After SFT + RL, per dimension:", "",
          "![precision and recall against τ after SFT + RL](eval/student_rl/pr_curve.png)", "",
          "![reliability after SFT + RL: accuracy per bin of stated confidence, with counts](eval/student_rl/reliability.png)", "",
          "## Training curves", "", "![SFT: train and eval loss](sft/training_curves.png)", "",
          "![RL: reward, agreement, NA rate, mean stated confidence](rl/training_curves.png)", ""]

    if cfg.target_precision:
        # Thresholds for deployment: chosen on a labelled dev world of its own, then applied to the test users.
        tdir, dev_world = os.path.join(out, "thresholds"), os.path.join(out, "thresholds", "dev_world")
        # Its test users are the dev users (its 10 train users go unused), as in the command of docs/results.md.
        run_stage("dev_world", ["profilebench.py", "--out", dev_world, "--n-train", 10, "--n-test", cfg.n_dev, "--seed",
                                cfg.seed + DEV_SEED_OFFSET], out, log)
        run_stage("predict_dev", ["predict.py", "--model", rl_dir, "--users", f"{dev_world}/test.jsonl", "--max-new-tokens",
                                  cfg.eval_max_new_tokens, "--out", f"{tdir}/dev_profiles.jsonl"], out, log)
        run_stage("thresholds_dev", ["evaluate.py", "--predictions", f"{tdir}/dev_profiles.jsonl", "--data",
                                     f"{dev_world}/test.jsonl", "--out", f"{tdir}/dev", "--target-precision",
                                     cfg.target_precision], out, log)
        run_stage("thresholds_test", ["evaluate.py", "--predictions", f"{out}/eval/student_rl/predictions.jsonl", "--data",
                                      f"{world}/test.jsonl", "--out", f"{tdir}/test", "--thresholds",
                                      f"{tdir}/dev/thresholds.json"], out, log)
        doc = _read_json(os.path.join(tdir, "dev", "thresholds.json"))
        applied = _read_json(os.path.join(tdir, "test", "metrics.json"))["at_thresholds"]
        results["thresholds"] = {"dev": doc, "test": applied}
        md += [f"## Thresholds for a precision of {cfg.target_precision:.2f} (after SFT + RL)", "",
               f"τ per dimension: the smallest whose precision's one-sided {doc['bound_level']:.0%} Wilson lower bound "
               + ("(Bonferroni over the levels searched) " if doc.get("correction") == "bonferroni" else "") +
               f"reaches {cfg.target_precision:.2f} on {cfg.n_dev} labelled dev users (a world of its own, seed "
               f"{cfg.seed + DEV_SEED_OFFSET}); applied to the {cfg.n_test} test users. Unreachable: that dimension "
               "abstains everywhere. In %.", "", thresholds_table(doc, applied), ""]

    if cfg.ablations:
        ablation_rows = [("full method", rows["student_rl"], "after SFT + RL")]
        keys = cfg.variant_keys()
        for key, desc, flags in [a for a in SFT_ABLATIONS if a[0] in keys]:
            adir = os.path.join(out, "ablations", key)
            run_stage(f"calibrate_{key}", ["calibrate.py", "--samples", f"{out}/teacher_train.jsonl", "--users",
                                           f"{world}/train.jsonl", "--out", f"{adir}/sft.jsonl", *flags], out, log)
            sft_stage(f"sft_{key}", f"{adir}/sft.jsonl", f"{adir}/sft")
            ablation_rows.append((desc, predict_and_evaluate(key, f"{adir}/sft", cfg, world, out, log),
                                  f"after SFT (compare: {100 * rows['student_sft']['avg_f1']:.2f})"))
        for key, desc, flags in [a for a in RL_ABLATIONS if a[0] in keys]:
            adir = os.path.join(out, "ablations", key)
            run_stage(f"rl_{key}", [*launch, "rl.py", *rl_common, *flags, "--output-dir", f"{adir}/rl", *resume_flags(f"{adir}/rl")],
                      out, log)
            ablation_rows.append((desc, predict_and_evaluate(key, f"{adir}/rl", cfg, world, out, log), "after SFT + RL"))
        key, desc = SFT_CONTROL
        if key in keys:
            adir = os.path.join(out, "ablations", key)
            run_stage(f"sft_{key}", [*launch, "sft.py", "--config", cfg.sft_config, "--model", sft_dir, "--init-student",
                                     "false", "--data", f"{out}/sft.jsonl", "--seed", seed,
                                     *_rl_budget(cfg.rl_config, rl_extra), "--output-dir", f"{adir}/sft",
                                     *resume_flags(f"{adir}/sft")], out, log)
            ablation_rows.append((desc, predict_and_evaluate(key, f"{adir}/sft", cfg, world, out, log),
                                  "after SFT + more SFT"))
        results["ablations"] = {desc: m for desc, m, _ in ablation_rows}
        # Δ vs full: paired bootstrap of each variant against the full method on the same test users. It only
        # reads predictions, so it runs every time (done=False): another set of variants on the same --out is
        # compared anew instead of refused.
        ablation_dir = os.path.join(out, "eval", "compare_ablations")
        run_stage("compare_ablations", ["evaluate.py", "compare", f"{out}/eval/student_rl/predictions.jsonl",
                                        *[f"{out}/eval/{key}/predictions.jsonl" for key in keys], "--data",
                                        f"{world}/test.jsonl", "--out", ablation_dir], out, log, done=False)
        paired = _read_json(os.path.join(ablation_dir, "comparison.json"))
        results["ablation_differences"] = paired
        deltas = dict(zip(keys, paired["differences"]))
        md += ["## Ablations (each one switch of the normal scripts)", "",
               "Δ vs full: avg F1 of the variant minus the full method's, in points, with its 95 % paired-bootstrap "
               "interval over the same test users (evaluate.py compare).", "",
               "| variant | compared at | avg F1 | Δ vs full [95% CI] | mean stated conf |", "|---|---|---|---|---|"]
        for (desc, m, stage), key in zip(ablation_rows, [None] + keys):
            conf = m.get("mean_confidence")
            delta = _delta(deltas[key], "f1", 100, 2) if key else "+0.00"
            md.append(f"| {desc} | {stage} | {100 * m['avg_f1']:.2f} | {delta} | {'-' if conf is None else f'{conf:.2f}'} |")
        md.append("")

    minutes = (time.time() - t_start) / 60
    stage_minutes = sum(s["seconds"] or 0 for s in log) / 60
    results["minutes"] = round(minutes, 2)
    results["stage_minutes"] = round(stage_minutes, 2)
    md += ["## Commands (each stage's equivalent command line, with the time it took)", "", "```"]
    md += [f"{s['command']}    # {'?' if s['seconds'] is None else round(s['seconds'])} s" for s in log] + ["```", "",
           f"Stages took {stage_minutes:.1f} min in all; this invocation {minutes:.1f} min."]
    atomic_write_text(os.path.join(out, "results.md"), "\n".join(md) + "\n")
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print("\n" + "\n".join(md[:5]) + "\n")
    print(f"\nwrote {out}/results.md and {out}/results.json (stages {stage_minutes:.1f} min; this invocation {minutes:.1f} min)")
    return results


def main(argv=None):
    cfg, rest = load_config(DemoConfig, argv, prog="pipeline.py", description=__doc__.strip().split("\n\n")[0])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --key value (see --help)")
    run_demo(cfg)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a bad option, or a stage that another command made (see _stage)
        sys.exit(f"pipeline.py: error: {e}")
    except subprocess.CalledProcessError as e:  # the stage printed its own error above
        sys.exit(f"pipeline.py: error: a stage failed (exit status {e.returncode}): {' '.join(e.cmd)}")

