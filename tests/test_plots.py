"""plots.py: each figure has the lines and bars its data asks for (read from the matplotlib objects, not
pixels), and the PNGs evaluate.py, plots.py and the training scripts write exist and are PNGs."""
import json

import pytest

import common
import evaluate
import plots

PNG = b"\x89PNG\r\n\x1a\n"

TAX = {"name": "tiny", "dimensions": {"a": {"description": "", "classes": ["x", "y", "NA"]},
                                      "b": {"description": "", "classes": ["p", "q", "NA"]},
                                      "c": {"description": "", "classes": ["s", "t", "NA"]}}}
USERS = [{"user_id": f"u{i}", "labels": {"a": "x", "b": "p", "c": "s"}} for i in range(6)]
PREDS = {f"u{i}": {"a": {"label": "x" if i % 2 else "y", "confidence": 1 + i},
                   "b": {"label": "p", "confidence": 10 - i},
                   "c": {"label": "NA", "confidence": 5}} for i in range(6)}


@pytest.fixture(scope="module")
def metrics():
    return evaluate.evaluate(PREDS, USERS, TAX)


def test_precision_recall_figure_one_line_per_dimension(metrics):
    fig = plots.precision_recall_figure(metrics["curves"])
    ax_p, ax_r = fig.axes
    for ax in (ax_p, ax_r):
        assert [line.get_label() for line in ax.lines] == ["a", "b", "c"]
        assert all(list(line.get_xdata()) == list(range(11)) for line in ax.lines)
    b_precision = list(ax_p.lines[1].get_ydata())  # b: kept while c >= τ, all correct
    assert b_precision[:6] == [1.0] * 6
    c_precision = ax_p.lines[2].get_ydata()  # c: always NA, precision undefined: a gap
    assert all(v != v for v in c_precision)


def test_reliability_figure_has_a_bar_per_bin_and_the_counts(metrics):
    fig = plots.reliability_figure(metrics["reliability"])
    ax = fig.axes[0]
    assert len(ax.patches) == 10 and len(ax.lines) == 1  # ten bins, the diagonal
    counts = [r["n"] for r in metrics["reliability"]]
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(n for n in counts if n)
    heights = [p.get_height() for p in ax.patches]
    assert heights == [r["accuracy"] or 0.0 for r in metrics["reliability"]]


def test_f1_comparison_figure_groups_rows_by_dimension(metrics):
    rows = [("teacher, one answer", metrics), ("teacher, vote@8", metrics), ("after SFT", metrics),
            ("after SFT + RL", metrics)]
    fig = plots.f1_comparison_figure(rows, list(TAX["dimensions"]))
    ax = fig.axes[0]
    assert len(ax.patches) == 4 * 4  # 3 dimensions + avg, 4 rows
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [name for name, _ in rows]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c", "avg F1"]
    assert ax.patches[3].get_height() == pytest.approx(100 * metrics["avg_f1"])


def rl_records(n):
    records = [{"step": 0, "dev_avg_f1": 0.5}]  # the step-0 dev evaluation has no rollout metrics
    for s in range(1, n + 1):
        r = {"step": s, "reward_mean": 0.1 * s, "majority_ratio": 0.8, "na_rate": 0.2, "confidence": 6.0}
        if s % 5 == 0:
            r["probe_agreement"] = 0.9
        records.append(r)
    return records


def test_training_curves_rl_sft_and_long_runs():
    fig = plots.training_curves_figure(rl_records(10))
    reward, agreement, na, confidence = fig.axes
    assert [len(ax.lines) for ax in fig.axes] == [1, 2, 1, 1]
    assert list(reward.lines[0].get_xdata()) == list(range(1, 11))
    assert list(agreement.lines[1].get_xdata()) == [5, 10]  # probe agreement: logged every 5 steps
    long = plots.training_curves_figure(rl_records(100))  # raw (faint) + moving average per series
    assert [len(ax.lines) for ax in long.axes] == [2, 3, 2, 2]  # 20 probe points: one line
    sft = plots.training_curves_figure([{"step": s, "loss": 5.0 / s, **({"eval_loss": 1.0} if s % 3 == 0 else {})}
                                        for s in range(1, 10)])
    assert len(sft.axes) == 1 and [line.get_label() for line in sft.axes[0].lines] == ["train loss", "eval loss"]
    assert sft.axes[0].get_yscale() == "log"


def test_moving_average_by_hand():
    assert plots.moving_average([1, 2, 3, 4, 5], 1) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert plots.moving_average([4.0, 0.0], 5) == [2.0, 2.0]


def test_plots_command_and_evaluate_write_pngs(tmp_path, metrics):
    run = tmp_path / "rl"
    common.write_jsonl(run / "metrics.jsonl", rl_records(12))
    plots.main(["--run", str(run)])
    assert (run / "training_curves.png").read_bytes().startswith(PNG)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"loss": 2}\n')
    with pytest.raises(common.DataError, match=r"metrics\.jsonl:2: step: expected"):
        plots.main(["--run", str(run)])
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(common.DataError, match=r"metrics\.jsonl: empty"):
        plots.main(["--run", str(run)])
    # evaluate.py: both figures next to report.md, which embeds them
    tax, data, preds = tmp_path / "tax.json", tmp_path / "d.jsonl", tmp_path / "p.jsonl"
    tax.write_text(json.dumps(TAX))
    common.write_jsonl(data, USERS)
    common.write_jsonl(preds, [{"user_id": k, "profile": v} for k, v in PREDS.items()])
    evaluate.main(["--predictions", str(preds), "--data", str(data), "--out", str(tmp_path / "eval"), "--taxonomy", str(tax)])
    for name in ("pr_curve.png", "reliability.png"):
        data_bytes = (tmp_path / "eval" / name).read_bytes()
        assert data_bytes.startswith(PNG) and len(data_bytes) > 5000
        assert f"]({name})" in (tmp_path / "eval" / "report.md").read_text()
