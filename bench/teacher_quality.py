"""
How good is the simulated teacher? (The figures of docs/results.md, "The synthetic world and the simulated teacher".)

Draws the default world (4000 train / 1000 test users, seed 0), lets profilebench.SimTeacher write
8 answers per test user through the real prompt -> parse -> vote path, and prints:
single-answer avg F1, vote@8 avg F1 (confidence-weighted and plain majority), AUROC of the pooled
confidence for correctness, histograms of raw pooled vs quantile-calibrated confidence, precision at
τ = 1..10, and the "shape to reach" of issue 3 next to each figure.

    python bench/teacher_quality.py [--n-test 1000] [--samples 8] [--seed 0] [--lang en]
    python bench/teacher_quality.py --smoke     # CI: 40 + 40 users, 4 answers each
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import confprofile  # noqa: E402
import evaluate  # noqa: E402
import profilebench  # noqa: E402


def histogram_line(counts, width=40):
    """One text bar per bin, scaled to the largest bin."""
    top = max(counts.values()) or 1
    return "\n".join(f"  {k:>5} {'#' * round(width * v / top):<{width}} {v}" for k, v in counts.items())


def raw_histogram(values):
    """Counts of pooled confidence r in unit bins [0,1), [1,2), ..., [9,10]."""
    counts = {f"{b}-{b + 1}": 0 for b in range(10)}
    for v in values:
        b = min(9, int(v))
        counts[f"{b}-{b + 1}"] += 1
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--n-train", type=int, default=4000, help="training users drawn (the world is drawn as in the demo)")
    parser.add_argument("--n-test", type=int, default=1000, help="labelled test users profiled")
    parser.add_argument("--samples", type=int, default=8, help="teacher answers per user")
    parser.add_argument("--seed", type=int, default=0, help="world and teacher seed")
    parser.add_argument("--lang", default="en", help="world language")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (40 train and 40 test users, 4 answers "
                        "each): CI checks the benchmark still runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n_train, args.n_test, args.samples = 40, 40, 4
    taxonomy = confprofile.load_taxonomy()
    dims = confprofile.dimensions(taxonomy)

    t0 = time.perf_counter()
    _, _, test = profilebench.make_world(args.n_train, args.n_test, args.seed, args.lang, taxonomy)
    t_world = time.perf_counter() - t0
    teacher = profilebench.SimTeacher(taxonomy, seed=args.seed)
    t0 = time.perf_counter()
    texts = {u["user_id"]: teacher.answer(confprofile.render_prompt(u, taxonomy), args.samples) for u in test}
    t_teacher = time.perf_counter() - t0
    parsed = {uid: [confprofile.parse_answer(t, taxonomy) for t in ts] for uid, ts in texts.items()}
    n_answers = sum(len(p) for p in parsed.values())
    format_failures = sum(not a["format_ok"] for p in parsed.values() for a in p) / n_answers

    single = evaluate.evaluate({uid: evaluate.profile_from_parse(p[0]) for uid, p in parsed.items()}, test, taxonomy)
    votes = {w: {uid: confprofile.vote(p, taxonomy, w) for uid, p in parsed.items()} for w in confprofile.WEIGHTINGS}
    voted = {w: evaluate.evaluate({uid: evaluate.profile_from_vote(v) for uid, v in votes[w].items()}, test, taxonomy)
             for w in confprofile.WEIGHTINGS}
    conf, maj = voted["confidence"], voted["majority"]

    print(f"world: {args.n_train}+{args.n_test} users ({args.lang}) in {t_world:.2f}s | SimTeacher: "
          f"{n_answers} answers in {t_teacher:.2f}s ({n_answers / t_teacher:,.0f} answers/s) | "
          f"format failures {format_failures:.3f}")
    print(f"{'figure':<44} {'ours':>8}   shape to reach (issue 3)")
    print(f"{'single-answer avg F1':<44} {single['avg_f1']:>8.4f}   about 0.45-0.65")
    print(f"{'vote@' + str(args.samples) + ' avg F1, confidence-weighted':<44} {conf['avg_f1']:>8.4f}   "
          f">= single + 0.05 ({single['avg_f1'] + 0.05:.4f})")
    print(f"{'vote@' + str(args.samples) + ' avg F1, plain majority':<44} {maj['avg_f1']:>8.4f}   <= confidence-weighted")
    print(f"{'AUROC pooled confidence (vote) -> correct':<44} {conf['auroc']:>8.4f}   > 0.5 (informative)")
    print(f"{'AUROC stated confidence (single) -> correct':<44} {single['auroc']:>8.4f}")
    print(f"{'single: mean stated confidence / 10':<44} {single['mean_confidence'] / 10:>8.4f}   "
          f"vs its precision {evaluate.mean_defined(r['precision'] for r in single['per_dimension'].values()):.4f} (over-confident)")
    print(f"{'ECE single / vote (pooled r)':<44} {single['ece']:>8.4f} / {conf['ece']:.4f}")
    print("per dimension F1 (single | vote conf | vote majority):")
    for d in dims:
        print(f"  {d:<12} {single['per_dimension'][d]['f1']:.3f} | {conf['per_dimension'][d]['f1']:.3f} | "
              f"{maj['per_dimension'][d]['f1']:.3f}")
    print("precision / recall at tau (vote, confidence-weighted; mean over dimensions):")
    for r in conf["threshold_sweep"]:
        print(f"  tau={r['tau']:<2} P={evaluate._fmt(r['precision'])} R={evaluate._fmt(r['recall'])} "
              f"F1={r['f1']:.3f} coverage={r['coverage']:.3f}")

    raw = [v[d]["pooled_confidence"] for v in votes["confidence"].values() for d in dims if v[d] is not None]
    print("raw pooled confidence r (all users x dimensions):")
    print(histogram_line(raw_histogram(raw)))
    try:
        import calibrate
    except ImportError:
        print("calibrated: calibrate.py not available")
        return
    levels = []
    for d in dims:  # quantile calibration is per dimension, over all users
        values = [v[d]["pooled_confidence"] for v in votes["confidence"].values() if v[d] is not None]
        levels += calibrate.calibrate_quantile(values)
    counts = {str(k): 0 for k in range(1, 11)}
    for level in levels:
        counts[str(level)] += 1
    print("quantile-calibrated confidence (levels 1..10):")
    print(histogram_line(counts))


if __name__ == "__main__":
    main()
