"""
Figures of the trade-offs the tables report, as small PNGs (matplotlib, Agg: no display needed).

Each drawing function takes what the scripts already compute (evaluate.py's metrics, a run's
metrics.jsonl records) and returns a matplotlib Figure, so a test can count its lines and bars;
save_png writes one atomically. Who draws what:

* evaluate.py, next to report.md: precision and recall against τ, one line per dimension
  (precision_recall_figure), the reliability diagram (reliability_figure) and the risk–coverage
  curve (risk_coverage_figure);
* pipeline.py, next to results.md: avg and per-dimension F1 of its rows (f1_comparison_figure);
* sft.py and rl.py at the end of a run, or this command for any run folder: the training curves
  (training_curves_figure), SFT's loss and eval loss, RL's reward, agreement, NA rate and mean
  stated confidence (what tells a healthy run from a collapsing one: docs/design.md, "Reading a
  Stage-2 run").

    python plots.py --run runs/demo/rl              # -> runs/demo/rl/training_curves.png
"""
import dataclasses
import io
import math
import os

from matplotlib.figure import Figure  # the object API: no pyplot state, no display; PNGs go through Agg

from common import ConfigError, DataError, atomic_write_bytes, check_fields, iter_jsonl, load_config, opt, run_cli

DPI = 100
TRAINING_CURVES = "training_curves.png"
SMOOTH_ABOVE = 40  # a longer series is drawn raw (faint) with its moving average on top
# RL panels: (title, [(metrics.jsonl key, legend label)]): one line per key present in the log
RL_PANELS = [
    ("reward", [("reward_mean", "mean reward")]),
    ("agreement", [("majority_ratio", "rollouts agreeing with the quasi label"),
                   ("probe_agreement", "greedy labels = the SFT student's (probe)")]),
    ("NA rate", [("na_rate", "answered dimensions saying NA")]),
    ("mean stated confidence", [("confidence", "rollouts"), ("dev_confidence", "greedy, dev users")]),
]
SFT_LINES = [("loss", "train loss"), ("eval_loss", "eval loss")]
MARKED_LEVELS = 20  # risk_coverage_figure marks each confidence level's block end up to this many levels


def _value(x):
    """A metric for plotting: None (undefined) becomes NaN, which matplotlib leaves as a gap."""
    return math.nan if x is None else x


def save_png(fig, path):
    """Render `fig` to PNG and write it atomically (common.atomic_write_bytes); returns path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def precision_recall_figure(curves, title=""):
    """Precision and recall against the threshold τ, one line per dimension in each of two panels.
    curves: evaluate()'s metrics["curves"], {dim: [{"tau", "precision", "recall", ...}, ...]} (precision
    None where nothing is kept: a gap)."""
    fig = Figure(figsize=(9, 3.4), dpi=DPI, layout="constrained")
    ax_p, ax_r = fig.subplots(1, 2, sharex=True)
    for dim, curve in curves.items():
        taus = [r["tau"] for r in curve]
        ax_p.plot(taus, [_value(r["precision"]) for r in curve], marker=".", label=dim)
        ax_r.plot(taus, [_value(r["recall"]) for r in curve], marker=".", label=dim)
    for ax, name in ((ax_p, "precision"), (ax_r, "recall")):
        ax.set_xlabel("threshold τ (keep a label when its confidence ≥ τ)")
        ax.set_ylabel(name)
        ax.set_xticks(range(0, 11))
        ax.grid(alpha=0.3)
    ax_p.set_ylim(top=1.01)  # the bottom follows the data: precisions sit close together
    ax_r.set_ylim(0, 1.01)
    ax_r.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def reliability_figure(rows, title=""):
    """The reliability diagram: per bin of stated confidence c/10, the accuracy of its predictions (one
    bar per bin, labelled with its count n) against the diagonal of perfect calibration.
    rows: evaluate()'s metrics["reliability"], [{"bin", "n", "mean_confidence", "accuracy"}] (an empty
    bin draws a bar of height 0)."""
    fig = Figure(figsize=(4.6, 3.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    width = 1 / len(rows)
    centres = [(b + 0.5) * width for b in range(len(rows))]
    bars = ax.bar(centres, [r["accuracy"] or 0.0 for r in rows], width=width * 0.9, color="tab:blue", alpha=0.8,
                  label="accuracy")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for bar, r in zip(bars, rows):
        if r["n"]:
            ax.annotate(f"{r['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("stated confidence c / 10 (count above each bar)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def risk_coverage_figure(lines, blocks=None, oracle=None, title=""):
    """Risk (error rate of what is kept) against coverage (share of the predictions kept, the most confident
    first): one line per group, {name: ([coverage], [risk])} from evaluate.risk_coverage_line; blocks
    {name: evaluate.risk_coverage_blocks rows} marks each confidence level's end on the lines (labelled
    with its level for the first group; not when a group has more than MARKED_LEVELS levels); oracle ([coverage], [risk]): the ordering that keeps every right
    prediction first, dashed. The area under a line is its AURC."""
    fig = Figure(figsize=(5.6, 3.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for i, (name, (xs, ys)) in enumerate(lines.items()):
        line = ax.plot(xs, ys, linewidth=2.0 if i == 0 else 1.0, label=name)[0]
        ends = (blocks or {}).get(name) or []
        if len(ends) > MARKED_LEVELS:  # a vote's pooled confidence: hundreds of levels, the line alone says it
            ends = []
        if ends:
            ax.plot([b["coverage"] for b in ends], [b["risk"] for b in ends], linestyle="none", marker=".",
                    color=line.get_color())
        if i == 0:
            for b in ends:
                ax.annotate(f"{b['confidence']:g}", (b["coverage"], b["risk"]), fontsize=6, xytext=(0, 3),
                            textcoords="offset points", ha="center")
    if oracle:
        ax.plot(*oracle, color="grey", linestyle="--", linewidth=1, label="oracle ordering")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of the predictions kept, most confident first)")
    ax.set_ylabel("risk (error rate of those kept)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    return fig

def f1_comparison_figure(rows, dims, title=""):
    """Grouped bars of F1 (%): one group per dimension and one for the average, one bar per row.
    rows: [(row name, evaluate() metrics)]; dims: the dimensions in order."""
    groups = list(dims) + ["avg F1"]
    fig = Figure(figsize=(9, 3.4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    for i, (name, m) in enumerate(rows):
        values = [100 * m["per_dimension"][d]["f1"] for d in dims] + [100 * m["avg_f1"]]
        ax.bar([g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))], values, width=width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=len(rows), loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def budget_figure(runs, title=""):
    """dev avg F1 (%) over the steps of each RL run (budget.py). runs: [(label, [(step, dev_avg_f1)])]."""
    fig = Figure(figsize=(7, 3.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for label, curve in runs:
        if curve:
            ax.plot([s for s, _ in curve], [100 * v for _, v in curve], marker="o", markersize=3, label=label)
    ax.set_xlabel("RL step")
    ax.set_ylabel("dev avg F1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def moving_average(values, half_width):
    """Centred mean m_i = mean(v_j : |j − i| ≤ h), the window cut at both ends (no lag, unlike a trailing mean)."""
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half_width), min(len(values), i + half_width + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def training_curves_figure(records, title=""):
    """A run's curves from its metrics.jsonl records (one dict per line, each with "step"). An RL log
    (it has reward_mean) gives four panels (RL_PANELS); an SFT log gives the train and eval loss (log
    scale). A key is drawn over the steps whose record has it (eval loss and probe agreement are logged
    every few steps only): one line, or for a series of more than SMOOTH_ABOVE points a faint line of
    the raw values and a centred moving average over 1/20 of them on top (two lines, one colour)."""
    panels = panels_of(records)
    is_rl = panels is RL_PANELS
    fig = Figure(figsize=(9, 5.2) if is_rl else (5.6, 3.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 2).flatten() if is_rl else [fig.subplots()]
    for ax, (name, keys) in zip(axes, panels):
        notes = []
        for key, label in keys:
            points = series(records, key)
            note = non_finite_note(label, points)
            if note:
                notes.append(note)
            points = [(step, v) for step, v in points if math.isfinite(v)]  # NaN would blank the moving average too
            if not points:
                continue
            steps, values = zip(*points)
            if len(points) > SMOOTH_ABOVE:
                raw = ax.plot(steps, values, linewidth=0.7, alpha=0.35)[0]
                ax.plot(steps, moving_average(values, max(1, len(values) // 40)), color=raw.get_color(), label=label)
            else:
                ax.plot(steps, values, marker=".", label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        elif not notes:
            ax.text(0.5, 0.5, "not in this log", ha="center", va="center", transform=ax.transAxes, color="grey")
        if notes:  # a diverged run: say so where the line is missing, not an empty panel
            ax.text(0.5, 0.5 if not ax.lines else 0.9, "\n".join(notes), ha="center", va="center", fontsize=7,
                    transform=ax.transAxes, color="tab:red", wrap=True)
    if not is_rl and axes[0].lines:
        axes[0].set_yscale("log")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def series(records, key):
    """[(step, value)] of the records that log `key` as a number (NaN and infinities included)."""
    return [(r["step"], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def panels_of(records):
    """The panels of a run's curves: RL_PANELS for an RL log (it has reward_mean), else SFT's loss."""
    return RL_PANELS if any("reward_mean" in r for r in records) else [("loss", SFT_LINES)]


def non_finite_note(label, points):
    """The note for a series [(step, value)] that is NaN or infinite somewhere (a diverged run), else None."""
    bad = [step for step, v in points if not math.isfinite(v)]
    if not bad:
        return None
    where = "every step" if len(bad) == len(points) else f"{len(bad)} of {len(points)} steps, first at step {bad[0]}"
    return f"{label}: NaN or infinite at {where}"


def non_finite_notes(records):
    """A note per plotted series with a NaN or infinite value (what draw_training_curves prints)."""
    notes = [non_finite_note(label, series(records, key)) for _, keys in panels_of(records) for key, label in keys]
    return [note for note in notes if note]


def read_metrics(path):
    """A run's metrics.jsonl -> [record]; each line must be an object with an integer "step"."""
    records = []
    for _, where, record in iter_jsonl(path, expected="one metrics object per line"):
        if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
            raise DataError(f"{where}: step: expected a metrics object with an integer step")
        records.append(record)
    return records


def draw_training_curves(run_dir, out=""):
    """run_dir/metrics.jsonl -> out (default run_dir/training_curves.png); returns the path written."""
    path = os.path.join(run_dir, "metrics.jsonl")
    records = read_metrics(path)
    if not records:
        raise DataError(f"{path}: empty; expected the metrics of at least one step")
    fig = training_curves_figure(records, title=os.path.basename(os.path.normpath(run_dir)))
    for note in non_finite_notes(records):
        print(f"{path}: {note} (the run diverged there; the figure shows the finite values only)", flush=True)
    return save_png(fig, out or os.path.join(run_dir, TRAINING_CURVES))


@dataclasses.dataclass
class PlotsConfig:
    run: str = opt("", "an sft.py / rl.py output_dir: draws its metrics.jsonl", nonempty=True)
    out: str = opt("", "the PNG to write (empty: RUN/training_curves.png)")

    def __post_init__(self):
        check_fields(self, "plots")


def main(argv=None):
    args, rest = load_config(PlotsConfig, argv, prog="plots.py", description=__doc__.strip().split("\n\n")[0])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --key value (see --help)")
    print(f"wrote {draw_training_curves(args.run, args.out)}")


if __name__ == "__main__":
    run_cli(main, "plots.py")
