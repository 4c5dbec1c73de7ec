"""calibrate.py: the three calibrations with hand-computed levels, and the CLI end to end on a
hand-made teacher.jsonl (tiny two-dimension taxonomy so every number can be checked by hand)."""
import collections
import json
import os
import random
import re
import subprocess
import sys

import pytest

import calibrate as cal
import common
import profilebench
from common import DataError
from calibrate import calibrate_none, calibrate_quantile, fit_isotonic
from confprofile import format_answer, load_taxonomy, parse_answer, read_users, render_prompt, vote

# -----------------------------------------------------------------------------
# quantile: level = 1 + floor(10 · (midrank − ½) / n)


def test_quantile_distinct_values_are_equal_frequency():
    assert calibrate_quantile(list(range(10))) == list(range(1, 11))  # n = 10: rank r -> level r
    assert calibrate_quantile([0.5 * i for i in range(20)]) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10]
    assert calibrate_quantile(list(range(10))[::-1]) == list(range(10, 0, -1))  # order of input kept


def test_quantile_ties_share_a_level():
    # sorted 1, 2, 2, 3, 5 (n = 5): midranks 1, 2.5, 2.5, 4, 5
    # -> 1 + floor(10·0.5/5) = 2, 1 + floor(10·2/5) = 5, 1 + floor(10·3.5/5) = 8, 1 + floor(10·4.5/5) = 10
    assert calibrate_quantile([3, 1, 2, 2, 5]) == [8, 2, 5, 5, 10]
    # 4 zeros + 4 tens (n = 8): midranks 2.5 and 6.5 -> 1 + floor(10·2/8) = 3 and 1 + floor(10·6/8) = 8
    assert calibrate_quantile([0, 10, 0, 10, 0, 10, 0, 10]) == [3, 8] * 4


def test_quantile_ties_are_ties_up_to_float_rounding():
    # r = (S/T)·mean(c) in floats: 4/5·(4/4) = 0.8 and 6/9·(6/5) = 0.7999999999999999 are both 4/5, one tie:
    # sorted 0.8, 0.8, 5, 6, 7, 8 (n = 6): midranks 1.5, 1.5, 3, 4, 5, 6
    # -> 1 + floor(10·1/6) = 2, then 1 + floor(10·2.5/6) = 5, 6, 8, 10
    assert 4 / 5 * (4 / 4) != 6 / 9 * (6 / 5)
    assert calibrate_quantile([4 / 5 * (4 / 4), 6 / 9 * (6 / 5), 5, 6, 7, 8]) == [2, 2, 5, 6, 8, 10]
    # 0.3·10 = 3.0000000000000004 ties with 3 whichever comes first; 3.001 is a value of its own:
    # sorted 1, 3, 3, 3.001 (n = 4): midranks 1, 2.5, 2.5, 4 -> 1 + floor(10·0.5/4) = 2, 1 + floor(10·2/4) = 6, 9
    assert calibrate_quantile([3.0, 0.3 * 10, 3.001, 1.0]) == calibrate_quantile([0.3 * 10, 3.0, 3.001, 1.0]) == [6, 6, 9, 2]


def test_quantile_constant_input_and_tiny_n():
    assert calibrate_quantile([4.2] * 7) == [6] * 7  # midrank 4: 1 + floor(10·3.5/7) = 6
    assert calibrate_quantile([7.0]) == [6]  # n = 1: 1 + floor(10·0.5) = 6
    assert calibrate_quantile([]) == []
    # n = 3 < levels: 1 + floor(10·0.5/3) = 2, 1 + floor(10·1.5/3) = 6, 1 + floor(10·2.5/3) = 9
    assert calibrate_quantile([9.0, 0.0, 3.3]) == [9, 2, 6]
    assert calibrate_quantile([1, 2], levels=4) == [2, 4]  # 1 + floor(4·0.5/2) = 2, 1 + floor(4·1.5/2) = 4


# -----------------------------------------------------------------------------
# none and isotonic


def test_none_rounds_half_up_and_clamps():
    assert calibrate_none([0.0, 0.5, 1.49, 5.5, 9.51, 10.0, 12]) == [1, 1, 1, 6, 10, 10, 10]


def test_isotonic_pool_adjacent_violators_by_hand():
    # r: 1 2 3 4 5, correct: 0 1 0 1 1 -> (2, 3) violate and pool to 0.5
    level = fit_isotonic([5, 2, 3, 1, 4], [1, 1, 0, 0, 1])
    assert level.blocks == [(1, 0.0), (2, 0.5), (4, 1.0), (5, 1.0)]
    assert [level.probability(x) for x in [0, 1, 2, 2.5, 3, 3.9, 4, 9]] == [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0]
    assert [level(x) for x in [0, 1, 2.5, 4, 9]] == [1, 1, 5, 10, 10]


def test_isotonic_equal_values_pooled_first_and_all_violating():
    # r = 1 twice (correct 1, 0) -> 0.5; r = 2: 0; violates -> pooled (1 + 0 + 0) / 3
    level = fit_isotonic([1, 1, 2], [True, False, False])
    assert level.blocks == [(1, pytest.approx(1 / 3))]
    assert level(1.5) == 3  # round(10/3) = 3
    with pytest.raises(ValueError):
        fit_isotonic([], [])


def test_probability_to_level():
    assert [cal.probability_to_level(p) for p in [0.0, 0.04, 0.26, 0.5, 0.86, 1.0]] == [1, 1, 3, 5, 9, 10]


# -----------------------------------------------------------------------------
# The CLI end to end

TAXONOMY = {"name": "tiny", "dimensions": {"gender": {"description": "Gender.", "classes": ["male", "female", "NA"]},
                                           "age": {"description": "Age.", "classes": ["young", "old", "NA"]}}}


def answer(g, gc, ge, a, ac, ae):
    return json.dumps({"gender": {"label": g, "confidence": gc, "evidence": ge}, "age": {"label": a, "confidence": ac, "evidence": ae}})


TEACHER = [
    # gender: female 8 + 9 -> S 17, r = 17/17 · 8.5 = 8.5, evidence of the 9. age: young 6 vs old 4 -> r = 6/10 · 6 = 3.6
    ("u1", [answer("female", 8, "makeup", "young", 6, "games"), answer("female", 9, "self-report", "old", 4, "news"), "garbage"]),
    # gender: male 5 vs female 5, tied twice -> NA, r = 0, no evidence. age: old 7 + 9 -> r = 8.0
    ("u2", [answer("male", 5, "beard", "old", 7, "retired"), answer("female", 5, "pink", "old", 9, "pension")]),
    # one answer: r = its confidence
    ("u3", ["<think>{hmm}</think>" + answer("NA", 3, "none", "young", 10, "school")]),
    # no valid age anywhere -> left out and reported
    ("u4", ["nonsense", '{"gender": {"label": "male", "confidence": 7}}']),
]


@pytest.fixture
def world(tmp_path):
    (tmp_path / "tax.json").write_text(json.dumps(TAXONOMY), encoding="utf-8")
    with open(tmp_path / "teacher.jsonl", "w", encoding="utf-8") as f:
        for uid, texts in TEACHER:
            f.write(json.dumps({"user_id": uid, "samples": [{"text": t, "finish_reason": "stop"} for t in texts]}) + "\n")
    with open(tmp_path / "users.jsonl", "w", encoding="utf-8") as f:
        for uid, _ in TEACHER:
            f.write(json.dumps({"user_id": uid, "behavior": {"watched": ["化妆教程"]}, "demographic": {"signature": "你好"}},
                               ensure_ascii=False) + "\n")
    return tmp_path


def run(world, *extra):
    argv = ["--samples", str(world / "teacher.jsonl"), "--users", str(world / "users.jsonl"), "--out", str(world / "sft.jsonl"),
            "--taxonomy", str(world / "tax.json"), "--audit", str(world / "audit.jsonl"), *extra]
    summary = common.run_cli(cal.main, "calibrate.py", argv)
    sft = [json.loads(line) for line in open(world / "sft.jsonl", encoding="utf-8")]
    return sft, summary


def targets(sft):
    return {r["user_id"]: {d: (v["label"], v["confidence"], v["evidence"]) for d, v in json.loads(r["messages"][-1]["content"]).items()}
            for r in sft}


def test_cli_quantile_end_to_end(world):
    sft, summary = run(world)
    # kept n = 3. gender r: u1 8.5, u2 0, u3 3 -> ranks 3, 1, 2 -> levels 9, 2, 6 (see the quantile test)
    # age r: u1 3.6, u2 8.0, u3 10 -> ranks 1, 2, 3 -> levels 2, 6, 9
    assert targets(sft) == {
        "u1": {"gender": ("female", 9, "self-report"), "age": ("young", 2, "games")},
        "u2": {"gender": ("NA", 2, ""), "age": ("old", 6, "pension")},
        "u3": {"gender": ("NA", 6, "none"), "age": ("young", 9, "school")}}
    assert sft[0]["messages"][-1]["content"] == (
        '{"gender": {"label": "female", "confidence": 9, "evidence": "self-report"}, '
        '"age": {"label": "young", "confidence": 2, "evidence": "games"}}')
    assert [r["calibrated"] for r in sft] == [{"gender": 9, "age": 2}, {"gender": 2, "age": 6}, {"gender": 6, "age": 9}]
    tax = json.loads((world / "tax.json").read_text())
    for r in sft:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert "化妆教程" in r["messages"][1]["content"]
        assert parse_answer(r["messages"][-1]["content"], tax)["format_ok"]
    assert summary["users_kept"] == 3 and summary["users_without_valid_answer"] == 1
    assert summary["dropped_user_ids"] == ["u4"] and summary["missing_by_dimension"] == {"gender": 0, "age": 1}
    assert summary["samples_total"] == 8 and summary["samples_format_ok"] == 5  # u1: 2, u2: 2, u3: 1 (think ok)
    assert summary["label_distribution"] == {"gender": {"female": 1, "NA": 2}, "age": {"young": 2, "old": 1}}
    # before = pooled rounded half up: gender 8.5 -> 9, 0 -> 1, 3 -> 3; after = 9, 2, 6
    assert summary["confidence_histogram_before"]["gender"] == {str(k): int(k in (1, 3, 9)) for k in range(1, 11)}
    assert summary["confidence_histogram_after"]["gender"] == {str(k): int(k in (2, 6, 9)) for k in range(1, 11)}
    assert json.loads((world / "sft.jsonl.summary.json").read_text()) == summary
    audit = [json.loads(line) for line in open(world / "audit.jsonl", encoding="utf-8")]
    assert [a["user_id"] for a in audit] == ["u1", "u2", "u3", "u4"]
    assert audit[0]["answers"][1]["dims"] == {"gender": ["female", 9], "age": ["old", 4]}
    assert audit[0]["vote"]["age"] == {"label": "young", "scores": {"young": 6, "old": 4}, "n_valid": 2,
                                       "pooled_confidence": 3.6, "calibrated": 2}
    assert audit[3]["kept"] is False and audit[3]["reason"] == "no valid answer for age"


def test_cli_none_majority_single_answer_labels_only(world):
    sft, _ = run(world, "--method", "none")  # round(8.5) = 9, round(3.6) = 4, 0 -> 1, 8, 3, 10
    assert [r["calibrated"] for r in sft] == [{"gender": 9, "age": 4}, {"gender": 1, "age": 8}, {"gender": 3, "age": 10}]
    # majority: u1 age young 1 vs old 1, highest single confidence young 6 > 4 -> young, r = 1/2 · 6 = 3 -> 3
    sft, summary = run(world, "--method", "none", "--weighting", "majority")
    assert sft[0]["calibrated"] == {"gender": 9, "age": 3} and summary["weighting"] == "majority"
    # single answer: each user's first answer valid in every dimension; r = its confidence
    sft, _ = run(world, "--method", "none", "--single-answer")
    assert targets(sft)["u1"] == {"gender": ("female", 8, "makeup"), "age": ("young", 6, "games")}
    assert targets(sft)["u2"] == {"gender": ("male", 5, "beard"), "age": ("old", 7, "retired")}
    sft, summary = run(world, "--target", "labels_only")
    assert sft[0]["messages"][-1]["content"] == '{"gender": "female", "age": "young"}'
    assert sft[0]["calibrated"] == {"gender": 9, "age": 2} and summary["target"] == "labels_only"


def test_cli_isotonic_with_dev_labels(world):
    dev = [("u1", "female", "old"), ("u2", "male", "old"), ("u3", "NA", "young")]
    with open(world / "dev.jsonl", "w") as f:
        for uid, gl, al in dev:
            f.write(json.dumps({"user_id": uid, "labels": {"gender": gl, "age": al}}) + "\n")
    sft, _ = run(world, "--method", "isotonic", "--dev-labels", str(world / "dev.jsonl"))
    # gender (r, correct): (0, F) (3, T) (8.5, T) -> P 0, 1, 1 -> levels 1, 10, 10 for u2, u3, u1
    # age: u1 (3.6, F: young != old), u2 (8, T), u3 (10, T) -> 1, 10, 10
    assert [r["calibrated"] for r in sft] == [{"gender": 10, "age": 1}, {"gender": 1, "age": 10}, {"gender": 10, "age": 10}]


def test_cli_errors(world, tmp_path):
    with pytest.raises(SystemExit):
        run(world, "--method", "isotonic")  # no dev labels
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u1", "samples": [{"text": "x"}]}\n{"user_id": "u1", "samples": []}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: user_id: duplicate 'u1'"):
        list(cal.read_samples(bad))
    bad.write_text('{"user_id": "u1", "samples": [{"finish_reason": "stop"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: samples\[0\]: expected an object with a string \"text\""):
        list(cal.read_samples(bad))
    tax = json.loads((world / "tax.json").read_text())
    with pytest.raises(DataError, match="'u1': not in --users"):
        cal.build_sft(world / "teacher.jsonl", "", tax, tmp_path / "o" / "no.jsonl", audit=tmp_path / "o" / "a.jsonl")
    assert os.listdir(tmp_path / "o") == []  # no output, no temp or spill file left


def test_empty_input_fails_and_unanswered_users_are_reported(world, capsys):
    """#13 item 13: an empty --samples (or one where no user has a valid answer) is an error, not an
    empty SFT set and exit 0; users without a valid teacher answer, and users of --users that the
    teacher never answered, are printed and listed in the summary."""
    (world / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit) as e:
        common.run_cli(cal.main, "calibrate.py", ["--samples", str(world / "empty.jsonl"), "--out", str(world / "e.jsonl"), "--taxonomy", str(world / "tax.json")])
    assert "empty.jsonl: no teacher records" in str(e.value.code)
    (world / "bad.jsonl").write_text(json.dumps({"user_id": "u4", "samples": [{"text": "nonsense"}]}) + "\n")
    with pytest.raises(SystemExit) as e:
        common.run_cli(cal.main, "calibrate.py", ["--samples", str(world / "bad.jsonl"), "--out", str(world / "e.jsonl"), "--taxonomy", str(world / "tax.json")])
    assert "none of the 1 users has a valid teacher answer in every dimension (u4)" in str(e.value.code)
    assert not (world / "e.jsonl").exists()
    with open(world / "users.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"user_id": "u5", "behavior": {"watched": ["news"]}}) + "\n")
    capsys.readouterr()
    _, summary = run(world)
    assert summary["dropped_user_ids"] == ["u4"] and summary["users_not_answered"] == ["u5"]
    printed = capsys.readouterr().out
    assert "1 user(s) left out, without a valid teacher answer in every dimension: u4" in printed
    assert "1 user(s) in --users but not in --samples (never answered): u5" in printed


def test_cli_subprocess_prints_summary(world):
    out = subprocess.run([sys.executable, "calibrate.py", "--samples", str(world / "teacher.jsonl"), "--users",
                          str(world / "users.jsonl"), "--out", str(world / "sft2.jsonl"), "--taxonomy", str(world / "tax.json")],
                         capture_output=True, text=True, timeout=60, cwd=cal.__file__.rsplit("/", 1)[0])
    assert out.returncode == 0, out.stderr
    assert "3 kept, 1 without a valid answer (of 4)" in out.stdout
    assert len(read_users(world / "users.jsonl", taxonomy=TAXONOMY)) == 4


def test_cli_isotonic_with_partial_dev_labels(world):
    """#13 item 9: dev labels with gaps (a questionnaire question skipped) are valid; each dimension's
    calibration is fitted on the users labelled in it. The full dev set's numbers without u3's gender:
    gender (r, correct): u2 (0, F), u1 (8.5, T) -> P 0, 1 -> levels 1, 10; u3's r = 3 falls on the first
    step, P 0 -> level 1. Age as with the full set: 1, 10, 10."""
    with open(world / "dev.jsonl", "w") as f:
        f.write(json.dumps({"user_id": "u1", "labels": {"gender": "female", "age": "old"}}) + "\n")
        f.write(json.dumps({"user_id": "u2", "labels": {"gender": "male", "age": "old"}}) + "\n")
        f.write(json.dumps({"user_id": "u3", "labels": {"age": "young"}}) + "\n")
    sft, _ = run(world, "--method", "isotonic", "--dev-labels", str(world / "dev.jsonl"))
    assert [r["calibrated"] for r in sft] == [{"gender": 10, "age": 1}, {"gender": 1, "age": 10}, {"gender": 1, "age": 10}]


def test_cli_bad_input_is_one_line(world):
    """#13 item 12: every bad input is one line "calibrate.py: error: ..." and exit status 1 (a missing file used
    to end in a traceback), and --out naming an input is refused before it is overwritten."""
    users = (world / "users.jsonl").read_bytes()
    for extra, message in ((["--samples", str(world / "missing.jsonl")], r"No such file or directory: .*missing\.jsonl"),
                           (["--out", str(world / "users.jsonl")], r"users\.jsonl: --out is the input --users")):
        argv = ["--samples", str(world / "teacher.jsonl"), "--users", str(world / "users.jsonl"), "--out",
                str(world / "sft.jsonl"), "--taxonomy", str(world / "tax.json"), *extra]
        with pytest.raises(SystemExit) as e:
            common.run_cli(cal.main, "calibrate.py", argv)
        assert isinstance(e.value.code, str) and "\n" not in e.value.code
        assert e.value.code.startswith("calibrate.py: error: ") and re.search(message, e.value.code), e.value.code
    assert (world / "users.jsonl").read_bytes() == users


# -----------------------------------------------------------------------------
# Streaming (#16): two passes and a spill file give what voting and calibrating everything in memory gives


def in_memory_reference(teacher, users, taxonomy):
    """The SFT set, audit and summary computed the plain way, every record in memory (the docstrings'
    definitions, written out): what calibrate.py must reproduce byte for byte while streaming."""
    dims = list(taxonomy["dimensions"])
    kept, audit, dropped, missing_by_dim = [], [], [], {d: 0 for d in dims}
    for rec in teacher:
        parses = [parse_answer(s["text"], taxonomy) for s in rec["samples"]]
        votes = vote(parses, taxonomy)
        entry = {"user_id": rec["user_id"], "answers": [
            {"format_ok": p["format_ok"], "dims": {d: p["dims"][d] and [p["dims"][d]["label"], p["dims"][d]["confidence"]]
                                                   for d in dims}} for p in parses]}
        missing = [d for d in dims if votes[d] is None]
        for d in missing:
            missing_by_dim[d] += 1
        if missing:
            dropped.append(rec["user_id"])
            entry.update(kept=False, reason=f"no valid answer for {', '.join(missing)}")
        else:
            entry["kept"] = True
            kept.append((rec, votes, entry))
        audit.append(entry)
    levels = {d: calibrate_quantile([v[d]["pooled_confidence"] for _, v, _ in kept]) for d in dims}
    sft = []
    for i, (rec, votes, entry) in enumerate(kept):
        prompt = ([m for m in rec["messages"] if m["role"] != "assistant"] if "messages" in rec
                  else render_prompt(users[rec["user_id"]], taxonomy))
        answer = format_answer({d: {"label": votes[d]["label"], "confidence": levels[d][i],
                                    "evidence": votes[d]["evidence"]} for d in dims}, taxonomy)
        sft.append({"user_id": rec["user_id"], "messages": prompt + [{"role": "assistant", "content": answer}],
                    "calibrated": {d: levels[d][i] for d in dims}})
        entry["vote"] = {d: {"label": votes[d]["label"], "scores": votes[d]["scores"], "n_valid": votes[d]["n_valid"],
                             "pooled_confidence": round(votes[d]["pooled_confidence"], 6), "calibrated": levels[d][i]}
                         for d in dims}
    answered = {r["user_id"] for r in teacher}
    summary = {"users_total": len(teacher), "users_kept": len(kept), "dropped_user_ids": dropped,
               "missing_by_dimension": missing_by_dim, "users_not_answered": sorted(set(users) - answered),
               "label_distribution": {d: dict(collections.Counter(v[d]["label"] for _, v, _ in kept)) for d in dims},
               "confidence_histogram_after": {d: cal.histogram(levels[d]) for d in dims}}
    return sft, audit, summary


def test_streaming_gives_the_in_memory_result(tmp_path):
    """A synthetic world labelled by the simulated teacher, with the teacher file in another order than
    the users file (prompts are read back by byte offset), users left out (garbage answers), users
    never answered, stored prompts and Chinese text: the SFT set and audit are, byte for byte, the
    lines of the in-memory computation, and the summary has its figures."""
    taxonomy = load_taxonomy()
    train, _, _ = profilebench.make_world(160, 0, seed=3, lang="zh")
    teacher = profilebench.SimTeacher(taxonomy, seed=3)
    records = []
    for i, user in enumerate(train[:150]):
        texts = teacher.answer(render_prompt(user, taxonomy), 3)
        rec = {"user_id": user["user_id"], "samples": [{"text": t, "finish_reason": "stop"} for t in texts]}
        if i % 17 == 0:
            rec["samples"] = [{"text": "garbage", "finish_reason": "length"}]
        if i % 23 == 0:
            rec["messages"] = [{"role": "system", "content": "stored"}, {"role": "user", "content": f"用户 {i}"}]
        records.append(rec)
    random.Random(0).shuffle(records)
    (tmp_path / "users.jsonl").write_text("".join(common.dumps_line(u) for u in train), encoding="utf-8")
    (tmp_path / "teacher.jsonl").write_text("".join(common.dumps_line(r) for r in records), encoding="utf-8")
    summary = cal.main(["--samples", str(tmp_path / "teacher.jsonl"), "--users", str(tmp_path / "users.jsonl"),
                        "--out", str(tmp_path / "sft.jsonl"), "--audit", str(tmp_path / "audit.jsonl")])
    sft, audit, expected = in_memory_reference(records, {u["user_id"]: u for u in train}, taxonomy)
    assert (tmp_path / "sft.jsonl").read_text(encoding="utf-8") == "".join(common.dumps_line(r) for r in sft)
    assert (tmp_path / "audit.jsonl").read_text(encoding="utf-8") == "".join(common.dumps_line(r) for r in audit)
    assert {k: summary[k] for k in expected} == expected
    assert summary["users_kept"] == 141 and len(summary["users_not_answered"]) == 10  # 9 left out, 10 never answered
    assert any("messages" in r for r in records[:20]) and sorted(os.listdir(tmp_path)) == [
        "audit.jsonl", "sft.jsonl", "sft.jsonl.summary.json", "teacher.jsonl", "users.jsonl"]  # no spill left


@pytest.mark.parametrize("keep_stamp", [False, True])
def test_users_file_rewritten_between_the_passes_is_refused(world, monkeypatch, capsys, keep_stamp):
    """Pass 2 reads prompts back from --users at the byte offsets pass 1 indexed. The same users in
    another order, written between the passes, would give each SFT record another user's prompt: it is
    one error naming the file, whether the file's size and time stamp show the change (caught before any
    read) or not (keep_stamp: same size, time stamp put back; caught by the user_id read back)."""
    users = world / "users.jsonl"
    lines = users.read_text(encoding="utf-8").splitlines(keepends=True)
    before = os.stat(users)
    calibrate_levels = cal.calibrate_levels

    def rewrite_then_calibrate(*args, **kwargs):  # runs after pass 1 and the users index
        users.write_text("".join(lines[::-1]) + ("" if keep_stamp else "\n"), encoding="utf-8")
        if keep_stamp:
            os.utime(users, ns=(before.st_atime_ns, before.st_mtime_ns))
        return calibrate_levels(*args, **kwargs)

    monkeypatch.setattr(cal, "calibrate_levels", rewrite_then_calibrate)
    with pytest.raises(SystemExit) as e:
        run(world)
    message = str(e.value.code)
    assert message.startswith(f"calibrate.py: error: {users}: changed while calibrate.py was reading it") and "\n" not in message
    assert ("not user_id 'u1' as when it was indexed" in message) == keep_stamp  # u1: the first kept user
    assert (f"size {before.st_size} -> {before.st_size + 1} bytes" in message) != keep_stamp
    assert not (world / "sft.jsonl").exists() and not (world / "audit.jsonl").exists()  # nothing written
    assert sorted(os.listdir(world)) == ["tax.json", "teacher.jsonl", "users.jsonl"]  # no temp or spill file left


def test_users_file_unchanged_between_the_passes_reads_back_each_user(world):
    """The check costs nothing when the file stays: every kept user gets its own prompt."""
    sft, _ = run(world)
    tax = load_taxonomy(str(world / "tax.json"))
    users = {u["user_id"]: u for u in read_users(str(world / "users.jsonl"), taxonomy=tax)}
    assert [r["user_id"] for r in sft] == ["u1", "u2", "u3"]
    for r in sft:
        assert r["messages"][:-1] == render_prompt(users[r["user_id"]], tax)
