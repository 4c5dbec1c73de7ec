"""profilebench.py: the synthetic world (determinism, correlations, NA rules, Chinese) and the simulated teacher."""
import collections
import copy
import json

import pytest

import common
import confprofile
import evaluate
import profilebench as pb

TAXONOMY = confprofile.load_taxonomy()


@pytest.fixture(scope="module")
def world():
    return pb.make_world(300, 300, seed=0)


def _bytes(records):
    return "".join(common.dumps_line(r) for r in records).encode("utf-8")


def _phrase_index():
    """Every keyphrase the world can write -> (dim, class) or None (a distractor); asserts no collisions."""
    index = {}
    for lang, by_list in pb.TEMPLATES.items():
        templates = {t for ts in by_list.values() for t in ts}
        topics = [(topic, (dim, cls)) for dim, classes in pb.CUES.items() for cls, ts in classes.items() for topic in ts]
        topics += [(topic, None) for topic in pb.DISTRACTORS]
        for template in templates:
            for topic, meaning in topics:
                phrase = template.format(t=pb._text(topic, lang))
                assert index.get(phrase, meaning) == meaning, f"{phrase!r} is ambiguous"
                index[phrase] = meaning
    return index


def test_phrases_are_unambiguous():
    # the teacher's lexicon and any analysis map a keyphrase back to one topic: no two topics may collide
    n_topics = sum(len(t) for c in pb.CUES.values() for t in c.values()) + len(pb.DISTRACTORS)
    n_templates = sum(len({t for ts in by_list.values() for t in ts}) for by_list in pb.TEMPLATES.values())
    assert len(_phrase_index()) == n_topics * n_templates


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for seed, out in [(0, "a"), (0, "b"), (1, "c")]:
        pb.main(["--out", str(tmp_path / out), "--n-train", "40", "--n-test", "20", "--seed", str(seed)])
    for name in ("train.jsonl", "train_labels.jsonl", "test.jsonl", "world_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()
    train = confprofile.read_users(str(tmp_path / "a" / "train.jsonl"))
    test = confprofile.read_users(str(tmp_path / "a" / "test.jsonl"), require_labels=True)
    labels = [json.loads(line) for line in (tmp_path / "a" / "train_labels.jsonl").read_text().splitlines()]
    assert len(train) == 40 and len(test) == 20 and all("labels" not in u for u in train)
    assert [u["user_id"] for u in train] == [r["user_id"] for r in labels]
    assert not {u["user_id"] for u in train} & {u["user_id"] for u in test}


def test_chinese_world_round_trips(tmp_path):
    train, _, test = pb.make_world(5, 5, seed=3, lang="zh")
    path = tmp_path / "zh.jsonl"
    common.write_jsonl(str(path), test)
    assert "\\u" not in path.read_text(encoding="utf-8")  # written as UTF-8, not escaped
    assert confprofile.read_users(str(path), require_labels=True) == test
    phrases = [p for u in test for items in u["behavior"].values() for p in items]
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in p) or p.endswith("vlog") or "SUV" in p or "CFA" in p
               or "Excel" in p or "PPT" in p for p in phrases)
    for user in test:  # the prompt carries the Chinese record unchanged, and the teacher reads it back
        data = confprofile.extract_user_data(confprofile.render_prompt(user, TAXONOMY, history_budget=10_000))
        assert data == {"behavior": user["behavior"], "demographic": user["demographic"]}


def test_records_are_compact_and_well_formed(world):
    train, _, test = world
    for user in train + test:
        assert set(user["behavior"]) == set(pb.LISTS)
        assert all(6 <= len(items) <= 10 for items in user["behavior"].values())
        confprofile.validate_user(user, TAXONOMY, require_labels="labels" in user)


def test_correlations_and_gold_na_rules(world):
    _, _, test = world
    for u in test:
        lab, demo = u["labels"], u["demographic"]
        if lab["age"] == "under18":
            assert lab["life_stage"] in ("in_school", "NA") and lab["occupation"] in ("student", "NA")
        if lab["occupation"] == "retired" or lab["life_stage"] == "retired":
            assert lab["industry"] == "NA"
        if lab["occupation"] == "teacher":
            assert lab["industry"] in ("education", "NA")
        if lab["gender"] == "NA":  # declined: no trace left in the record
            assert "gender" not in demo
        if lab["age"] == "NA":
            assert "age" not in demo


def test_cues_come_from_the_gold_classes():
    # with only cue slots and no off-class cues, every keyphrase names a topic of a gold class
    cfg = pb.WorldConfig(cue_low=1.0, cue_high=1.0, off_class_cue=0.0)
    _, _, test = pb.make_world(0, 50, seed=5, config=cfg)
    index = _phrase_index()
    for u in test:
        for items in u["behavior"].values():
            for phrase in items:
                dim, cls = index[phrase]
                assert u["labels"][dim] == cls


def test_documented_rates_hold():
    _, _, test = pb.make_world(0, 3000, seed=1)
    cfg = pb.WorldConfig()
    gender_na = sum(u["labels"]["gender"] == "NA" for u in test) / len(test)
    assert abs(gender_na - cfg.declined["gender"]) < 0.015
    present = sum("gender" in u["demographic"] for u in test) / len(test)
    assert abs(present - cfg.gender_present * (1 - cfg.declined["gender"])) < 0.03
    counts = collections.Counter(u["labels"]["age"] for u in test)
    assert counts.most_common(1)[0][0] in ("18-24", "25-30", "31-40")


def test_custom_taxonomy_missing_classes_is_an_error():
    tax = copy.deepcopy(TAXONOMY)
    tax["dimensions"]["occupation"]["classes"].remove("farmer")
    with pytest.raises(ValueError, match="occupation.*farmer"):
        pb.make_world(1, 1, taxonomy=tax)


# -----------------------------------------------------------------------------
# SimTeacher


def test_teacher_is_label_blind(world):
    _, _, test = world
    teacher = pb.SimTeacher(TAXONOMY, seed=7)
    for user in test[:50]:
        stripped = {k: v for k, v in user.items() if k != "labels"}
        relabelled = dict(user, user_id="someone-else", labels={d: "NA" for d in TAXONOMY["dimensions"]})
        expected = teacher.answer(confprofile.render_prompt(user, TAXONOMY), 4)
        assert teacher.answer(confprofile.render_prompt(stripped, TAXONOMY), 4) == expected
        assert teacher.answer(confprofile.render_prompt(relabelled, TAXONOMY), 4) == expected
        # only the <user_data> block matters: another system prompt gives the same answers
        messages = confprofile.render_prompt(user, TAXONOMY)
        assert teacher.answer([{"role": "system", "content": "x"}, messages[1]], 4) == expected


def test_teacher_is_deterministic_and_order_free(world):
    _, _, test = world
    prompts = [confprofile.render_prompt(u, TAXONOMY) for u in test[:30]]
    a = [pb.SimTeacher(TAXONOMY, seed=1).answer(m, 3) for m in prompts]
    b = [pb.SimTeacher(TAXONOMY, seed=1).answer(m, 3) for m in reversed(prompts)][::-1]
    c = [pb.SimTeacher(TAXONOMY, seed=2).answer(m, 3) for m in prompts]
    assert a == b and a != c


def test_teacher_answers_parse(world):
    _, _, test = world
    teacher = pb.SimTeacher(TAXONOMY, seed=0, malformed_rate=0.0)
    for user in test[:100]:
        for text in teacher.answer(confprofile.render_prompt(user, TAXONOMY), 2):
            parsed = confprofile.parse_answer(text, TAXONOMY)
            assert parsed["format_ok"], text
            for dim, entry in parsed["dims"].items():
                assert entry["label"] in TAXONOMY["dimensions"][dim]["classes"] and 1 <= entry["confidence"] <= 10
                assert entry["evidence"]


def test_malformed_answers_exercise_the_parser(world):
    _, _, test = world
    teacher = pb.SimTeacher(TAXONOMY, seed=0, malformed_rate=1.0)
    texts = [t for u in test[:80] for t in teacher.answer(confprofile.render_prompt(u, TAXONOMY), 2)]
    parsed = [confprofile.parse_answer(t, TAXONOMY) for t in texts]
    ok = sum(p["format_ok"] for p in parsed) / len(parsed)
    assert 0.2 < ok < 0.8  # fences and wrong case pass; prose, truncation, unknown labels do not
    assert any("```json" in t for t in texts) and any("/10" in t for t in texts) and any("<think>" in t for t in texts)
    assert any(p["dims"]["gender"] is not None and not p["format_ok"] for p in parsed)  # salvaged partial answers


def test_teacher_confidence_is_informative_and_vote_helps(world):
    _, _, test = world
    teacher = pb.SimTeacher(TAXONOMY, seed=0)
    parsed = {u["user_id"]: [confprofile.parse_answer(t, TAXONOMY) for t in teacher.answer(confprofile.render_prompt(u, TAXONOMY), 8)]
              for u in test}
    single = evaluate.evaluate({k: evaluate.profile_from_parse(p[0]) for k, p in parsed.items()}, test, TAXONOMY)
    voted = evaluate.evaluate({k: evaluate.profile_from_vote(confprofile.vote(p, TAXONOMY)) for k, p in parsed.items()},
                              test, TAXONOMY)
    assert 0.4 < single["avg_f1"] < 0.7
    assert voted["avg_f1"] > single["avg_f1"] + 0.05
    assert single["auroc"] > 0.75 and voted["auroc"] > 0.65
    precision = [r["precision"] for r in voted["threshold_sweep"][:9]]
    assert precision == sorted(precision)


def test_chinese_teacher_reads_chinese():
    _, _, test = pb.make_world(0, 200, seed=0, lang="zh")
    teacher = pb.SimTeacher(TAXONOMY, seed=0)
    profiles = {u["user_id"]: evaluate.profile_from_parse(confprofile.parse_answer(
        teacher.answer(confprofile.render_prompt(u, TAXONOMY), 1)[0], TAXONOMY)) for u in test}
    assert evaluate.evaluate(profiles, test, TAXONOMY)["avg_f1"] > 0.4


def test_cli_bad_input_is_one_line(tmp_path):
    """#13 item 12: a bad --taxonomy (here: two classes equal up to case) is one line and exit status 1."""
    tax = copy.deepcopy(TAXONOMY)
    tax["dimensions"]["gender"]["classes"].append("Male")
    (tmp_path / "tax.json").write_text(json.dumps(tax))
    for taxonomy, message in ((tmp_path / "tax.json", "'Male' and 'male' are the same up to case/separators"),
                              (tmp_path / "missing.json", "taxonomy file not found")):
        with pytest.raises(SystemExit) as e:
            common.run_cli(pb.main, "profilebench.py", ["--out", str(tmp_path / "w"), "--n-train", "2", "--n-test", "1",
                                                        "--taxonomy", str(taxonomy)])
        assert isinstance(e.value.code, str) and "\n" not in e.value.code
        assert e.value.code.startswith("profilebench.py: error: ") and message in e.value.code, e.value.code
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("flags", [["--n-train", "-5"], ["--n-test", "-1"]])
def test_cli_rejects_negative_sizes(tmp_path, flags):
    """#13 item 13: a negative --n-train / --n-test is one line naming the key and exit status 1, not an empty
    world and exit 0. Zero is allowed (a world of test users only, or of training users only)."""
    with pytest.raises(SystemExit) as e:
        common.run_cli(pb.main, "profilebench.py", ["--out", str(tmp_path / "w"), "--n-train", "2", "--n-test", "1",
                                                    *flags])
    key = flags[0][2:].replace("-", "_")
    assert e.value.code == f"profilebench.py: error: profilebench: {key}: expected >= 0, got {flags[1]}"
    assert not (tmp_path / "w").exists()
    pb.main(["--out", str(tmp_path / "w"), "--n-train", "0", "--n-test", "1"])
    assert (tmp_path / "w" / "train.jsonl").read_text() == "" and (tmp_path / "w" / "test.jsonl").read_text()