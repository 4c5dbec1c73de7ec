"""
calibrate.py and evaluate.py at scale: wall time and peak memory (RSS) at 10k / 100k / 1M users.

For each size it writes a synthetic users file (with gold labels) and a teacher file of 8 answers per
user (--samples; texts made by confprofile.format_answer, drawn from a pool, so a million users take
seconds to write), then runs, each in a fresh process whose peak RSS is read from os.wait4:
    python calibrate.py --samples teacher.jsonl --users users.jsonl --out sft.jsonl --audit audit.jsonl
    python evaluate.py --predictions teacher.jsonl --data users.jsonl --out eval [--vote]
and prints wall seconds, CPU seconds (user + system, from os.wait4: unlike wall time, not inflated by
other jobs on a shared machine), peak MB, CPU µs and KB per user. Memory that grows with users × answers
shows as KB per user that does not fall with size; a fixed cost (Python, torch: ~290 MB) shows as one
that does.
With --baseline DIR (another checkout, e.g. `git worktree add /tmp/base <commit>`) the same commands
run from there too, side by side with their ratio (--baseline-up-to N: only at sizes ≤ N, for a
baseline that would not fit in memory above). Files go under --dir and are deleted after each size (the
1M teacher file is ~5.5 GB, plus the SFT set, audit and calibrate.py's spill file beside it).

    python bench/scale.py [--sizes 10000,100000,1000000] [--samples 8] [--vote] [--baseline DIR]
        [--baseline-up-to N] [--dir /tmp/confprofile-scale] [--keep]
    python bench/scale.py --smoke      # CI: 200 users, files in a temporary folder
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import confprofile  # noqa: E402

POOL = 512  # distinct answer texts to draw from
PHRASES = ["cooking videos", "stroller reviews", "stock market news", "campus life vlog", "gym routine", "retirement plans",
           "exam preparation", "wedding venues", "night shift nurse", "code review tips", "farm machinery", "makeup tutorials"]


def synthetic_answer(rng, taxonomy):
    """One teacher answer text: a label, a confidence 1..10 and a short evidence per dimension."""
    profile = {d: {"label": rng.choice(spec["classes"]), "confidence": rng.randint(1, 10),
                   "evidence": "; ".join(rng.sample(PHRASES, 2))} for d, spec in taxonomy["dimensions"].items()}
    return confprofile.format_answer(profile, taxonomy)


def write_world(folder, n_users, taxonomy, samples=8, seed=0):
    """users.jsonl (gold labels included) and teacher.jsonl (`samples` answers per user); returns their paths."""
    rng = random.Random(seed)
    pool = [json.dumps({"text": synthetic_answer(rng, taxonomy), "finish_reason": "stop"}, ensure_ascii=False)
            for _ in range(POOL)]
    dims = taxonomy["dimensions"]
    users, teacher = os.path.join(folder, "users.jsonl"), os.path.join(folder, "teacher.jsonl")
    with open(users, "w", encoding="utf-8") as fu, open(teacher, "w", encoding="utf-8") as ft:
        for i in range(n_users):
            uid = f"s{i:07d}"
            fu.write(json.dumps({"user_id": uid, "behavior": {"watched": rng.sample(PHRASES, 3),
                                                              "searched": rng.sample(PHRASES, 2)},
                                 "demographic": {"age": str(rng.randint(16, 70))},
                                 "labels": {d: rng.choice(spec["classes"]) for d, spec in dims.items()}}) + "\n")
            # the bytes common.dumps_line writes for {"user_id", "samples"}
            ft.write(f'{{"user_id": "{uid}", "samples": [' + ", ".join(rng.choices(pool, k=samples)) + "]}\n")
    return users, teacher


def measure(argv, cwd):
    """(wall seconds, CPU seconds, peak RSS in MB) of one command in a fresh process; its stderr is shown
    if it fails."""
    t0 = time.perf_counter()
    # stderr goes to a file, not a pipe: a pipe nobody reads until the end could fill and block the child
    with open(os.devnull, "w") as sink, tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=sink, stderr=log, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
        log.seek(0)
        stderr = log.read()
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:1])} failed:\n{stderr[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated numbers of users")
    p.add_argument("--samples", type=int, default=8, help="teacher answers per user")
    p.add_argument("--vote", action="store_true", help="evaluate.py --vote (parses all answers, not the first)")
    p.add_argument("--baseline", default="", help="another checkout to run the same commands from, side by side")
    p.add_argument("--baseline-up-to", type=int, default=0, help="run the baseline only at sizes up to this (0: all)")
    p.add_argument("--dir", default="/tmp/confprofile-scale", help="where the files go (deleted after each size)")
    p.add_argument("--keep", action="store_true", help="keep the files of the last size")
    p.add_argument("--smoke", action="store_true", help="200 users, files in a temporary folder: CI checks the "
                   "benchmark still runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.dir, args.keep = "200", tempfile.mkdtemp(prefix="bench-scale-"), False
    taxonomy = confprofile.load_taxonomy()
    sizes = [int(s) for s in args.sizes.split(",")]
    codes = [("ours", ROOT)] + ([("baseline", os.path.abspath(args.baseline))] if args.baseline else [])
    print(f"{'users':>9} {'teacher MB':>10} {'script':<10} {'code':<9} {'wall s':>8} {'CPU s':>8} {'peak MB':>8} "
          f"{'CPU µs/user':>11} {'KB/user':>8}")
    for n in sizes:
        folder = os.path.join(args.dir, str(n))
        os.makedirs(folder, exist_ok=True)
        users, teacher = write_world(folder, n, taxonomy, args.samples)
        size_mb = os.path.getsize(teacher) / 2 ** 20
        commands = {
            "calibrate": ["calibrate.py", "--samples", teacher, "--users", users, "--out",
                          os.path.join(folder, "sft.jsonl"), "--audit", os.path.join(folder, "audit.jsonl")],
            "evaluate": ["evaluate.py", "--predictions", teacher, "--data", users, "--out",
                         os.path.join(folder, "eval")] + (["--vote"] if args.vote else []),
        }
        for script, command in commands.items():
            figures = {}
            for code, cwd in codes:
                if code == "baseline" and args.baseline_up_to and n > args.baseline_up_to:
                    continue
                seconds, cpu, peak = measure(command, cwd)
                figures[code] = (seconds, cpu, peak)
                print(f"{n:>9} {size_mb:>10.0f} {script:<10} {code:<9} {seconds:>8.1f} {cpu:>8.1f} {peak:>8.0f} "
                      f"{1e6 * cpu / n:>11.0f} {1024 * peak / n:>8.2f}", flush=True)
            if "baseline" in figures:
                ours, base = figures["ours"], figures["baseline"]
                print(f"{'':>9} {'':>10} {script:<10} {'ratio':<9} "
                      + " ".join(f"{a / b:>8.2f}" for a, b in zip(ours, base)) + "   (ours / baseline)")
        if not (args.keep and n == sizes[-1]):
            shutil.rmtree(folder)
    if args.smoke:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
