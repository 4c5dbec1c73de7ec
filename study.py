"""
The Stage-2 study: the whole pipeline with its ablations and controls on K seeds, one table over them.

    python study.py --seeds 0,1,2,3,4 --out runs/study      # each seed: pipeline.py --seed S --ablations
    python study.py --seeds 0,1 --out runs/study --quick     # the --quick world and steps (CI's smoke: one seed)
    python study.py --variants rl_no_filter,rl_majority,rl_no_weighting   # some variants only (pipeline.py --variants)

Seed S is `python pipeline.py --seed S --ablations --untrained-row false --target-precision 0 --out
OUT/seedS`: its own world, teacher, SFT student and RL run, and every variant of the component study
from that same SFT student (without the untrained student's row and the thresholds, which no row of the
study reads). A finished stage is skipped, so a killed study resumes where it stopped and a seed
finished by hand is reused. Then each row (after SFT, after SFT + RL, every variant and both controls)
is read back from OUT/seedS/eval/KEY/predictions.jsonl on that seed's test users, and the table gives:

* avg F1, the mean over the seeds, and Δ vs full: the row's avg F1 minus the full method's (after SFT +
  RL) on the same seed and users, mean over the seeds;
* for both, a 95 % interval over seeds and users: a two-level percentile bootstrap whose replicate draws
  K seeds with replacement and, within each drawn seed, its test users with replacement; every row is
  scored on the same draw, so Δ is paired (`two_level_bootstrap`);
* each seed's own Δ, and the reading: "no difference measured" when the interval of Δ holds 0;
* Δ vs after SFT: the row minus the SFT student's, on the same draws (what RL, a variant or a control adds
  over the student it starts from);
* the RL runs' mechanism metrics (rl.py's metrics.jsonl, mean over a run's steps, then over the seeds):
  the difficulty filter's kept / too-easy / too-hard shares, vote_flip and reward_flip.

-> OUT/study.md, OUT/study.json. The test users inform no choice here: the study only reports.
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

from common import ConfigError, atomic_write_text, check_fields, iter_jsonl, load_config, opt, pct, run_cli, sgn
from confprofile import ROOT, load_taxonomy
from evaluate import (avg_f1_from_counts, bootstrap_weights, cell_codes, count_table, percentile_interval,
                      prediction_table)
from pipeline import RL_ABLATIONS, SFT_ABLATIONS, SFT_CONTROL, DemoConfig

FULL, SFT = "student_rl", "student_sft"  # the reference of Δ vs full, and of Δ vs after SFT
ROWS = ([(SFT, "after SFT", None), (FULL, "after SFT + RL (full method)", "rl")]
        + [(key, desc, None) for key, desc, _ in SFT_ABLATIONS]
        + [(key, desc, f"ablations/{key}/rl") for key, desc, _ in RL_ABLATIONS]
        + [(SFT_CONTROL[0], SFT_CONTROL[1], None)])  # (eval key, row name, the RL run's folder in a seed's out)
MECHANISM = ("kept_frac", "too_easy_frac", "too_hard_frac", "vote_flip", "reward_flip")


@dataclasses.dataclass
class StudyConfig:
    out: str = opt("runs/study", "the study's folder: seed S runs in OUT/seedS", nonempty=True)
    seeds: str = opt("0,1,2,3,4", "comma-separated seeds (each a whole pipeline with its ablations)", nonempty=True)
    quick: bool = opt(False, "pipeline.py --quick for every seed (a small world, a few steps: a smoke run)")
    procs: int = opt(2, "pipeline.py --procs: processes of SFT and RL", min=1)
    bootstrap: int = opt(1000, "replicates of the two-level bootstrap", min=10)
    variants: str = opt("", "pipeline.py --variants: the comma-separated variants to run (empty = every one); the "
                            "table has after SFT, the full method and these")

    def __post_init__(self):
        check_fields(self, "study")
        try:
            seeds = [int(s) for s in self.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"study: seeds: expected comma-separated integers, got {self.seeds!r}") from None
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ConfigError(f"study: seeds: expected distinct integers >= 0, got {self.seeds!r}")
        DemoConfig(ablations=True, variants=self.variants)  # the same check of the keys as pipeline.py's

    def rows(self):
        """The rows of ROWS this study reads: after SFT, the full method and the chosen variants."""
        keys = DemoConfig(ablations=True, variants=self.variants).variant_keys()
        return [row for row in ROWS if row[0] in (SFT, FULL) or row[0] in keys]


# -----------------------------------------------------------------------------
# The interval over seeds and users


def two_level_bootstrap(per_seed, replicates=1000, seed=0):
    """per_seed[k][r]: evaluate.UserCounts of row r on seed k's users. Returns (estimate [R], replicates [B, R]):
        estimate_r = (1/K) Σ_k avgF1(row r, seed k)
        replicate b: seeds k_1..k_K drawn with replacement; within each drawn k_i, its users drawn with
                     replacement (evaluate.bootstrap_weights, one draw shared by every row of that seed);
                     value_r = (1/K) Σ_i avgF1(row r, seed k_i, that draw)
    so a difference of two rows, replicate by replicate, is paired over seeds and users. numpy's
    default_rng(seed): the same seed, the same replicates."""
    def avg_f1(uc, w=None):
        return avg_f1_from_counts(count_table(uc, w))
    estimate = np.mean([[avg_f1(uc) for uc in rows] for rows in per_seed], axis=0)
    rng = np.random.default_rng(seed)
    boot = np.empty((replicates, len(per_seed[0])))
    for b in range(replicates):
        drawn = rng.integers(0, len(per_seed), len(per_seed))
        values = []
        for k in drawn:
            w = bootstrap_weights(rng, per_seed[k][0].n_users)
            values.append([avg_f1(uc, w) for uc in per_seed[k]])
        boot[b] = np.mean(values, axis=0)
    return estimate, boot


def reading(low, high):
    """A difference is a difference only when its interval leaves 0 out."""
    if low is None or low <= 0 <= high:
        return "no difference measured"
    return "higher than the full method" if low > 0 else "lower than the full method"


# -----------------------------------------------------------------------------
# Reading the seeds back


def seed_counts(seed_dir, taxonomy, rows=ROWS):
    """[UserCounts of each row of `rows`] on this seed's test users."""
    data = os.path.join(seed_dir, "world", "test.jsonl")
    out = []
    for key, _, _ in rows:
        path = os.path.join(seed_dir, "eval", key, "predictions.jsonl")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: missing; expected pipeline.py --ablations to have evaluated {key}")
        out.append(cell_codes(prediction_table(path, data, taxonomy)[0]))
    return out


def mechanism(run_dir):
    """{metric: mean over the run's steps} of an rl.py run's metrics.jsonl ({} when it has none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [r for _, _, r in iter_jsonl(path)] if os.path.exists(path) else []
    return {m: float(np.mean([r[m] for r in rows if m in r])) for m in MECHANISM if any(m in r for r in rows)}


def study_table(seeds, per_seed, mechanisms, replicates, study_rows=ROWS):
    """The study's rows as dicts (study.json) from the seeds' counts and their RL runs' mechanism metrics."""
    estimate, boot = two_level_bootstrap(per_seed, replicates)
    keys = [key for key, _, _ in study_rows]
    full, sft = keys.index(FULL), keys.index(SFT)
    rows = []
    for r, (key, name, run) in enumerate(study_rows):
        per = [avg_f1_from_counts(count_table(rows_k[r])) - avg_f1_from_counts(count_table(rows_k[full]))
               for rows_k in per_seed]
        low, high = percentile_interval(boot[:, r] - boot[:, full])
        f1_low, f1_high = percentile_interval(boot[:, r])
        sft_low, sft_high = percentile_interval(boot[:, r] - boot[:, sft])
        rows.append({"key": key, "row": name, "avg_f1": float(estimate[r]), "avg_f1_low": f1_low, "avg_f1_high": f1_high,
                     "delta": float(estimate[r] - estimate[full]), "delta_low": low, "delta_high": high,
                     "delta_per_seed": dict(zip(seeds, per)), "reading": "reference" if r == full else reading(low, high),
                     "delta_sft": float(estimate[r] - estimate[sft]), "delta_sft_low": sft_low, "delta_sft_high": sft_high,
                     "mechanism": {m: float(np.mean([mk[key][m] for mk in mechanisms]))
                                   for m in MECHANISM if run and all(m in mk[key] for mk in mechanisms)}})
    return rows


def render(rows, seeds, replicates, n_users):
    """study.md: one line per row."""
    lines = [f"# Stage-2 study: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {n_users} test users a seed", "",
             f"avg F1 (%): mean over the seeds. Δ vs full: the row minus the full method on the same seed and users, "
             f"mean over the seeds. [95 %]: two-level percentile bootstrap over seeds and users ({replicates} "
             "replicates, paired). Mechanism: rl.py's metrics.jsonl, mean over the steps, then over the seeds.", "",
             "| row | avg F1 [95 %] | Δ vs full [95 %] | Δ per seed | reading | Δ vs after SFT [95 %] | kept | too easy "
             "| too hard | vote_flip | reward_flip |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["mechanism"]
        mech = " | ".join(f"{m[k]:.3f}" if k in m else "–" for k in MECHANISM)
        lines.append(f"| {r['row']} | {pct(r['avg_f1'])} [{pct(r['avg_f1_low'])}, {pct(r['avg_f1_high'])}] | "
                     f"{sgn(r['delta'])} [{sgn(r['delta_low'])}, {sgn(r['delta_high'])}] | "
                     f"{' / '.join(sgn(d) for d in r['delta_per_seed'].values())} | {r['reading']} | "
                     f"{sgn(r['delta_sft'])} [{sgn(r['delta_sft_low'])}, {sgn(r['delta_sft_high'])}] | {mech} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg, rest = load_config(StudyConfig, argv, prog="study.py", description=__doc__.strip().split("\n\n")[0])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --key value (see --help)")
    seeds = [int(s) for s in cfg.seeds.split(",")]
    study_rows = cfg.rows()
    taxonomy = load_taxonomy()
    per_seed, mechanisms = [], []
    for s in seeds:
        seed_dir = os.path.join(cfg.out, f"seed{s}")
        cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), "--seed", str(s), "--ablations", "--out", seed_dir,
               "--procs", str(cfg.procs), "--untrained-row", "false", "--target-precision", "0",
               *(["--quick"] if cfg.quick else []),
               *(["--variants", cfg.variants] if cfg.variants else [])]
        print(f"\n=== seed {s}\n$ python {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode:
            raise ConfigError(f"pipeline.py --seed {s} failed (its own error is above); the finished stages are kept")
        per_seed.append(seed_counts(seed_dir, taxonomy, study_rows))
        mechanisms.append({key: mechanism(os.path.join(seed_dir, run)) for key, _, run in study_rows if run})
    rows = study_table(seeds, per_seed, mechanisms, cfg.bootstrap, study_rows)
    n_users = per_seed[0][0].n_users
    md = render(rows, seeds, cfg.bootstrap, n_users)
    atomic_write_text(os.path.join(cfg.out, "study.md"), md)
    atomic_write_text(os.path.join(cfg.out, "study.json"), json.dumps(
        {"config": dataclasses.asdict(cfg), "n_users": n_users, "rows": rows}, indent=2, ensure_ascii=False) + "\n")
    print("\n" + md + f"\nwrote {cfg.out}/study.md and {cfg.out}/study.json")
    return rows


if __name__ == "__main__":
    run_cli(main, "study.py")
