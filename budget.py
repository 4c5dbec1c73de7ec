"""
The RL budget chosen on a dev world: steps, users a step and learning rate, on a labelled world of its
own seed. The test users of the demo and of the study never enter it.

    python budget.py --out runs/budget                  # the dev world of seed 1000, the grid below
    python budget.py --out runs/budget --steps 50,100,200 --centre 100,4,1e-4   # around another budget
    python budget.py --out runs/budget --quick --steps 2,3 --users 2,4 --lrs 1e-4,3e-4 --eval-every 1   # CI
    python budget.py --seed 1001 --out runs/budget_1001 ...       # the same grid on another dev world
    python budget.py choose runs/budget runs/budget_1001 runs/budget_1002 --out runs/budget_choice

First `pipeline.py --seed SEED --out OUT/world --target-precision 0 --untrained-row false`: the dev
world (its own train users, unlabelled, and its labelled users, here the dev users), the teacher, the
SFT student, and RL at rl_demo.json. Then, from that SFT student, rl.py at each point of a one-factor
grid around a centre, rl_demo.json's budget (max_steps, batch_size = users a step, lr) unless --centre
names another: every value of `steps` at the centre's users and lr, every value of `users` at its steps
and lr, every value of `lrs` at its steps and users. Each run evaluates its greedy answers on dev
users every `eval_every` steps (rl.py --dev-data: the curve), and at its end on all of them as
pipeline.py evaluates a student (label.py, evaluate.py).

The table (OUT/budget.md, budget.json): each point's dev avg F1 with its paired Δ against the centre's
point (evaluate.py compare: a 95 % bootstrap over the dev users), and the collapse metrics of its last
tenth of steps (entropy, majority_ratio, na_rate, kept_frac, probe_agreement, stated confidence: what
collapses when self-consistency RL runs too long or too fast; docs/design.md, "Reading a Stage-2 run").
Above it, the headroom: the SFT student's greedy answers on the dev users against the vote of its own G
samples (label.py, evaluate.py --vote --na-weight W: RL's quasi labels, which RL moves the greedy answer
towards). The choice (`choose`): the point of highest dev avg F1 among those whose Δ's interval lies
above 0; none such, and the centre stays. OUT/budget.png: dev avg F1 over the steps of each run.

One dev world's choice can be that world's luck. `budget.py choose` reads several finished budget
folders, each on a dev world of its own seed around the same centre with the same rl.py settings, and
moves the config only to a point measured above the centre on every world (`choose_across`): the
highest mean dev avg F1 among those, else the centre -> OUT/choice.md, choice.json.
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

from common import ConfigError, atomic_write_text, check_fields, load_config, opt, pct, read_json, run_cli, sgn
from confprofile import ROOT
from pipeline import QUICK_RL, predict_and_evaluate, resume_flags, run_stage
from plots import budget_figure, read_metrics, save_png
from rl import RLConfig

COLLAPSE = ("entropy", "majority_ratio", "na_rate", "kept_frac", "probe_agreement", "confidence")


@dataclasses.dataclass
class BudgetConfig:
    out: str = opt("runs/budget", "the study's folder (the dev world's pipeline in OUT/world)", nonempty=True)
    seed: int = opt(1000, "the dev world's seed: a world of its own (the demo's seeds are 0..4, their threshold "
                          "dev worlds seed + 100)", min=0)
    steps: str = opt("50,100,200,400", "comma-separated max_steps, at the centre's users a step and lr", nonempty=True)
    users: str = opt("2,4,8", "comma-separated batch_size (users a step), at the centre's steps and lr", nonempty=True)
    lrs: str = opt("3e-5,1e-4,3e-4", "comma-separated lr, at the centre's steps and users a step", nonempty=True)
    rl_config: str = opt("configs/rl_demo.json", "rl.py's config: the grid's centre and every other setting",
                         nonempty=True)
    centre: str = opt("", "the grid's centre as STEPS,USERS,LR (a grid around another budget than the config's); "
                          "empty: rl_config's max_steps, batch_size and lr")
    eval_every: int = opt(50, "the dev curve: rl.py's greedy dev evaluation every this many steps", min=1)
    dev_size: int = opt(500, "dev users of each point of the curve (the end of a run is evaluated on all)", min=1)
    eval_max_new_tokens: int = opt(320, "greedy answer budget at the end-of-run evaluation (as pipeline.py's)", min=1)
    quick: bool = opt(False, "pipeline.py --quick: a small world and SFT (a smoke run)")
    procs: int = opt(2, "rl.py / pipeline.py processes (torchrun, one thread each); 1 = plain python", min=1)

    def __post_init__(self):
        check_fields(self, "budget")
        self.axes()
        if self.centre:
            parse_centre(self.centre)

    def axes(self):
        """(steps, users, lrs): the grid's values of each factor, parsed; distinct and > 0, else ConfigError."""
        axes = []
        for key, kind in (("steps", int), ("users", int), ("lrs", float)):
            try:
                values = [kind(v) for v in getattr(self, key).split(",")]
            except ValueError:
                raise ConfigError(f"budget: {key}: expected comma-separated {kind.__name__}s, "
                                  f"got {getattr(self, key)!r}") from None
            if min(values) <= 0 or len(set(values)) != len(values):
                raise ConfigError(f"budget: {key}: expected distinct values > 0, got {getattr(self, key)!r}")
            axes.append(values)
        return tuple(axes)


def parse_centre(text):
    """'STEPS,USERS,LR' -> (int, int, float), each > 0."""
    parts = text.split(",")
    try:
        centre = (int(parts[0]), int(parts[1]), float(parts[2])) if len(parts) == 3 else None
    except ValueError:
        centre = None
    if centre is None or min(centre) <= 0:
        raise ConfigError(f"budget: centre: expected STEPS,USERS,LR (two integers and a number, each > 0), "
                          f"got {text!r}")
    return centre


def grid(centre, steps, users, lrs):
    """The one-factor grid around centre = (steps, users, lr): the centre first, then each factor's other
    values with the other two at the centre."""
    points = [centre]
    points += [(s, centre[1], centre[2]) for s in steps]
    points += [(centre[0], u, centre[2]) for u in users]
    points += [(centre[0], centre[1], lr) for lr in lrs]
    return list(dict.fromkeys(points))


def point_name(point):
    steps, users, lr = point
    return f"s{steps}_u{users}_lr{lr:g}"


def collapse_metrics(records):
    """{metric: mean over the last max(1, floor(n / 10)) of the n training steps} of rl.py's metrics.jsonl."""
    steps = [r for r in records if "kept_frac" in r]  # training steps (a dev-only record has no kept_frac)
    tail = steps[len(steps) - max(1, len(steps) // 10):]
    return {m: float(np.mean([r[m] for r in tail if m in r])) for m in COLLAPSE if any(m in r for r in tail)}


def above_centre(row):
    """A row measured above the centre: the lower end of its Δ's interval > 0 (the centre's own row has none).
    None (a point a world did not run) is not above."""
    return row is not None and row["delta_low"] is not None and row["delta_low"] > 0


def choose(rows):
    """The row of highest dev avg F1 among those measured above the centre; the centre's row when none is."""
    better = [r for r in rows if above_centre(r)]
    return max(better, key=lambda r: r["avg_f1"]) if better else rows[0]


def choose_across(worlds):
    """worlds: each world's rows as budget.json writes them, the centre first and the same centre on every
    world. A point is a candidate when every world ran it and measured it above the centre there; the
    choice is the candidate of highest mean dev avg F1 over the worlds, else the centre: a point moves the
    config only where it helps on every dev world. -> (the chosen point's name, {name: [each world's row
    or None]}), names in first-seen order."""
    table = {}
    for i, rows in enumerate(worlds):
        for r in rows:
            table.setdefault(r["name"], [None] * len(worlds))[i] = r
    better = [name for name, per_world in table.items() if all(map(above_centre, per_world))]
    chosen = max(better, key=lambda n: np.mean([r["avg_f1"] for r in table[n]])) if better else worlds[0][0]["name"]
    return chosen, table


def render(rows, chosen, cfg, n_dev, headroom):
    lines = [f"# RL budget on the dev world (seed {cfg.seed}, {n_dev} labelled dev users)", "",
             "Δ vs centre: the point's dev avg F1 minus the centre's, with its 95 % paired bootstrap over the "
             "dev users (evaluate.py compare). Collapse metrics: rl.py's metrics.jsonl, mean over the last tenth of "
             "the steps.", "",
             f"Headroom: the SFT student on the dev users answers greedily at {pct(headroom['sft_greedy'])} avg F1; "
             f"the vote of its own {headroom['samples']} samples (na_weight {headroom['na_weight']:g}, what RL's quasi "
             f"labels are) reaches {pct(headroom['sft_self_vote'])} "
             f"({sgn(headroom['sft_self_vote'] - headroom['sft_greedy'])} points): RL moves the greedy answer towards "
             "that vote.", "",
             "| steps | users a step | lr | dev avg F1 | Δ vs centre [95 %] | " + " | ".join(COLLAPSE) + " |",
             "|---" * (5 + len(COLLAPSE)) + "|"]
    for r in rows:
        c = r["collapse"]
        lines.append(f"| {r['steps']} | {r['users']} | {r['lr']:g} | {pct(r['avg_f1'])} | "
                     + ("reference" if r is rows[0] else f"{sgn(r['delta'])} [{sgn(r['delta_low'])}, "
                        f"{sgn(r['delta_high'])}]")
                     + " | " + " | ".join(f"{c[m]:.3f}" if m in c else "–" for m in COLLAPSE) + " |")
    same = chosen is rows[0]
    lines += ["", f"Choice: {chosen['steps']} steps, {chosen['users']} users a step, lr {chosen['lr']:g}"
              + (" (the centre: no other point is measured above it)." if same else
                 " (measured above the centre)."), "", "![dev avg F1 over the steps of each run](budget.png)"]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class ChooseConfig:
    out: str = opt("runs/budget_choice", "where the choice across the dev worlds is written (choice.md, choice.json)",
                   nonempty=True)


# rl.py settings that differ between dev worlds by construction (their files, their seed, how a run was resumed)
PER_WORLD = ("model", "data", "stage1", "output_dir", "dev_data", "seed", "resume", "force_resume", "overwrite")


def read_world(folder):
    """(seed, budget.json's document, the centre run's rl.py settings but PER_WORLD) of a budget folder."""
    path = os.path.join(folder, "budget.json")
    if not os.path.exists(path):
        raise ConfigError(f"choose: {path}: not found; expected the --out folder of a finished budget.py run")
    doc = read_json(path)
    centre = doc["rows"][0]["name"]
    settings = read_json(os.path.join(folder, "runs", centre, "rl_config.json"))
    return doc["config"]["seed"], doc, {k: v for k, v in settings.items()  # "_inputs": the files' fingerprints
                                        if k not in PER_WORLD and not k.startswith("_")}


def render_choice(worlds, chosen, table):
    seeds = [seed for seed, _, _ in worlds]
    centre = worlds[0][1]["rows"][0]["name"]
    lines = [f"# RL budget across {len(worlds)} dev worlds (seeds {', '.join(map(str, seeds))})", "",
             "Each world: budget.py on its own seed (its own train users, SFT student and labelled dev users). A cell: "
             "the point's dev avg F1 and its Δ against the centre on that world [95 % paired bootstrap over its dev "
             "users]. A point moves the config only where it is measured above the centre on every world "
             "(`choose_across`).", "",
             "Headroom (SFT greedy → the vote of its own samples, on each world's dev users): " + "; ".join(
                 f"seed {seed}: {pct(doc['headroom']['sft_greedy'])} → {pct(doc['headroom']['sft_self_vote'])}"
                 for seed, doc, _ in worlds) + ".", "",
             "| steps | users a step | lr | " + " | ".join(f"seed {s}" for s in seeds) + " | mean dev avg F1 | above on every world |",
             "|---" * (5 + len(seeds)) + "|"]
    for name, per_world in table.items():
        r = next(r for r in per_world if r is not None)
        cells = ["–" if w is None else pct(w["avg_f1"]) + (" (centre)" if name == centre else
                 f", {sgn(w['delta'])} [{sgn(w['delta_low'])}, {sgn(w['delta_high'])}]") for w in per_world]
        mean = pct(np.mean([w["avg_f1"] for w in per_world])) if None not in per_world else "–"
        above = "–" if name == centre else ("yes" if all(map(above_centre, per_world)) else "no")
        lines.append(f"| {r['steps']} | {r['users']} | {r['lr']:g} | " + " | ".join(cells) + f" | {mean} | {above} |")
    r = next(r for r in table[chosen] if r is not None)
    lines += ["", f"Choice: {r['steps']} steps, {r['users']} users a step, lr {r['lr']:g}"
              + (" (the centre: no other point is measured above it on every world)." if chosen == centre
                 else " (measured above the centre on every world).")]
    return "\n".join(lines) + "\n"


def choose_main(argv):
    """budget.py choose DIR DIR ... --out OUT: the choice across dev worlds, each DIR a budget.py --out of
    its own seed around the same centre with the same rl.py settings -> OUT/choice.md, OUT/choice.json."""
    cfg, folders = load_config(ChooseConfig, argv, prog="budget.py choose", description=(
        "The RL budget across dev worlds:\n  python budget.py choose runs/budget runs/budget_1001 runs/budget_1002 "
        "--out runs/budget_choice\neach folder a finished budget.py run on a dev world of its own seed"))
    if len(folders) < 2:
        raise ConfigError(f"choose: expected two or more budget folders (each budget.py --out of its own dev world), "
                          f"got {len(folders)}")
    worlds = [read_world(f) for f in folders]
    seeds = [seed for seed, _, _ in worlds]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"choose: the folders' dev worlds have seeds {seeds}; expected a world of its own seed each")
    _, first_doc, first_settings = worlds[0]
    for folder, (_, doc, settings) in zip(folders[1:], worlds[1:]):
        if doc["rows"][0]["name"] != first_doc["rows"][0]["name"]:
            raise ConfigError(f"choose: {folder} has centre {doc['rows'][0]['name']}, {folders[0]} has "
                              f"{first_doc['rows'][0]['name']}; expected one centre on every world")
        differ = sorted(k for k in set(settings) | set(first_settings) if settings.get(k) != first_settings.get(k))
        if differ:
            raise ConfigError(f"choose: {folder} and {folders[0]} ran rl.py with other settings ({', '.join(differ)}); "
                              "expected the same rl.py config on every world")
    chosen, table = choose_across([doc["rows"] for _, doc, _ in worlds])
    md = render_choice(worlds, chosen, table)
    atomic_write_text(os.path.join(cfg.out, "choice.md"), md)
    atomic_write_text(os.path.join(cfg.out, "choice.json"), json.dumps(
        {"folders": folders, "seeds": seeds, "choice": chosen,
         "points": {name: [None if r is None else {k: r[k] for k in ("avg_f1", "delta", "delta_low", "delta_high")}
                           for r in per_world] for name, per_world in table.items()}},
        indent=2, ensure_ascii=False) + "\n")
    print(md + f"\nwrote {cfg.out}/choice.md and choice.json")
    return chosen, table


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["choose"]:
        return choose_main(argv[1:])
    cfg, rest = load_config(BudgetConfig, argv, prog="budget.py", description=__doc__.strip().split("\n\n")[0])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --key value (see --help)")
    rl_config = os.path.abspath(cfg.rl_config if os.path.exists(cfg.rl_config) else os.path.join(ROOT, cfg.rl_config))
    # the grid's centre as rl.py resolves it, with the pipeline's own rl.py flags (--quick's --max-steps)
    rl, _ = load_config(RLConfig, ["--config", rl_config, *(QUICK_RL if cfg.quick else [])], prog="rl.py")
    wdir = os.path.join(cfg.out, "world")
    cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), "--seed", str(cfg.seed), "--out", wdir,
           "--rl-config", rl_config, "--target-precision", "0", "--untrained-row", "false", "--procs", str(cfg.procs),
           *(["--quick"] if cfg.quick else [])]
    print(f"=== the dev world's pipeline\n$ python {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd).returncode:
        raise ConfigError(f"pipeline.py --seed {cfg.seed} failed (its error is above); the finished stages are kept")
    world, sft_dir = os.path.join(wdir, "world"), os.path.join(wdir, "sft")
    dev = os.path.join(world, "test.jsonl")
    launch = ["torchrun", "--standalone", f"--nproc_per_node={cfg.procs}"] if cfg.procs > 1 else []
    centre = parse_centre(cfg.centre) if cfg.centre else (rl.max_steps, rl.batch_size, rl.lr)
    points = grid(centre, *cfg.axes())
    log, runs = [], {}
    for point in points:
        name = point_name(point)
        run_dir = os.path.join(cfg.out, "runs", name)
        run_stage(f"rl_{name}", [*launch, "rl.py", "--config", rl_config, "--model", sft_dir, "--data",
                                 f"{world}/train.jsonl", "--stage1", f"{wdir}/sft.jsonl", "--seed", cfg.seed,
                                 "--max-steps", point[0], "--batch-size", point[1], "--lr", point[2], "--dev-data", dev,
                                 "--dev-size", cfg.dev_size, "--eval-every", cfg.eval_every, "--output-dir", run_dir,
                                 *resume_flags(run_dir)], cfg.out, log)
        predict_and_evaluate(name, run_dir, cfg, world, cfg.out, log)
        runs[name] = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    # The headroom: RL moves the greedy answer towards the vote of the student's own samples, so the SFT
    # student's self-vote on the dev users, against its greedy answer there, says whether RL has anything to
    # find (not how much: the vote RL follows is the current policy's, which improves as it trains).
    vote_dir = os.path.join(cfg.out, "eval", "self_vote")
    run_stage("self_vote_samples", ["label.py", "--teacher", sft_dir, "--users", dev, "--samples", rl.num_generations,
                                    "--temperature", rl.temperature, "--max-new-tokens", rl.max_new_tokens, "--seed",
                                    cfg.seed, "--out", f"{vote_dir}/samples.jsonl"], cfg.out, log)
    run_stage("self_vote", ["evaluate.py", "--predictions", f"{vote_dir}/samples.jsonl", "--data", dev, "--vote",
                            "--na-weight", rl.na_weight, "--out", vote_dir], cfg.out, log)
    headroom = {"sft_greedy": read_json(os.path.join(wdir, "eval", "student_sft", "metrics.json"))["avg_f1"],
                "sft_self_vote": read_json(os.path.join(vote_dir, "metrics.json"))["avg_f1"],
                "samples": rl.num_generations, "na_weight": rl.na_weight}
    names = [point_name(p) for p in points]
    compare_dir = os.path.join(cfg.out, "eval", "compare")
    run_stage("compare", ["evaluate.py", "compare", *[f"{cfg.out}/eval/{n}/predictions.jsonl" for n in names],
                          "--data", dev, "--out", compare_dir], cfg.out, log, done=False)
    comparison = read_json(os.path.join(compare_dir, "comparison.json"))
    differences = comparison["differences"]
    rows = []
    for i, (point, name) in enumerate(zip(points, names)):
        metrics = read_json(os.path.join(cfg.out, "eval", name, "metrics.json"))
        d = differences[i - 1]["pooled"]["f1"] if i else {"delta": 0.0, "low": None, "high": None}
        curve = [(r["step"], r["dev_avg_f1"]) for r in runs[name] if "dev_avg_f1" in r]
        rows.append({"name": name, "steps": point[0], "users": point[1], "lr": point[2], "avg_f1": metrics["avg_f1"],
                     "delta": d["delta"], "delta_low": d["low"], "delta_high": d["high"],
                     "collapse": collapse_metrics(runs[name]), "dev_curve": curve})
    chosen = choose(rows)
    md = render(rows, chosen, cfg, comparison["n_users"], headroom)
    curves = [(f"{r['steps']} steps, {r['users']} users, lr {r['lr']:g}", r["dev_curve"]) for r in rows]
    save_png(budget_figure(curves), os.path.join(cfg.out, "budget.png"))
    atomic_write_text(os.path.join(cfg.out, "budget.md"), md)
    atomic_write_text(os.path.join(cfg.out, "budget.json"), json.dumps(
        {"config": dataclasses.asdict(cfg), "rl_config": rl_config, "headroom": headroom, "rows": rows,
         "choice": chosen["name"]},
        indent=2, ensure_ascii=False) + "\n")
    print("\n" + md + f"\nwrote {cfg.out}/budget.md, budget.json and budget.png")
    return rows, chosen


if __name__ == "__main__":
    run_cli(main, "budget.py")
