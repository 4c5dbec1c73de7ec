"""The shape of the code: flat scripts whose imports only go downwards, every project import at the top
of its file, one definition of the end-of-turn tokens, and a --help line for every option."""
import ast
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each script may import only scripts of a lower layer: the study on top, then the pipeline, the stage scripts, the
# labelling job (predict.py writes through it) and the trainers' helpers, the sampler, the world /
# evaluation / calibration, the domain core and the model, the shared base and the processes.
LAYERS = [
    {"common", "distributed"},
    {"confprofile", "model", "plots", "checkpoint"},
    {"profilebench", "evaluate", "calibrate", "trainer"},
    {"rollout"},
    {"label", "rl_bookkeeping", "sft_data"},
    {"sft", "rl", "predict"},
    {"pipeline"},
    {"study", "budget"},
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def project_imports(path):
    """[(imported project module, line, at module top level?)] of one file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top = set(id(n) for n in tree.body)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module.split(".")[0]]
        else:
            continue
        out += [(n, node.lineno, id(node) in top) for n in names if n in LAYER]
    return out


def scripts():
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def test_every_script_has_a_layer():
    assert set(scripts()) == set(LAYER), "add the new script to LAYERS"


def test_imports_only_go_downwards_and_sit_at_the_top():
    problems = []
    for name in scripts():
        for imported, line, at_top in project_imports(os.path.join(ROOT, f"{name}.py")):
            if LAYER[imported] >= LAYER[name]:
                problems.append(f"{name}.py:{line} imports {imported} (layer {LAYER[imported]} >= {LAYER[name]})")
            if not at_top:
                problems.append(f"{name}.py:{line} imports {imported} inside a function")
    assert not problems, "\n".join(problems)


def test_the_walk_catches_an_upward_edge_and_a_cycle(tmp_path):
    """The check itself: an upward import and an import inside a function are found."""
    bad = tmp_path / "common.py"
    bad.write_text("import pipeline\n\ndef f():\n    import model\n")
    found = project_imports(str(bad))
    assert ("pipeline", 1, True) in found and ("model", 4, False) in found
    assert all(LAYER[m] >= LAYER["common"] for m, _, _ in found)  # both would be reported for common.py


def test_no_import_cycles():
    graph = {name: {m for m, _, _ in project_imports(os.path.join(ROOT, f"{name}.py"))} for name in scripts()}

    def reaches(a, b, seen=()):
        return b in graph[a] or any(reaches(c, b, seen + (a,)) for c in graph[a] if c not in seen)
    assert not [(a, b) for a in graph for b in graph[a] if reaches(b, a)]


def test_one_end_of_turn_definition():
    """The sampler stops on exactly the tokens the SFT mask trains: one list, in common.py."""
    hits = [p for p in glob.glob(os.path.join(ROOT, "*.py")) if "END_OF_TURN_TOKENS = " in open(p).read()]
    assert [os.path.basename(p) for p in hits] == ["common.py"]


def test_help_explains_every_option():
    """`python X.py --help` prints a line for every option of the script's config, each with a text."""
    import dataclasses

    import calibrate
    import evaluate
    import pipeline
    import plots
    import predict
    import profilebench
    import rl
    import label
    import sft
    import study
    for script, cls in (("rl.py", rl.RLConfig), ("sft.py", sft.SFTConfig), ("pipeline.py", pipeline.DemoConfig),
                        ("label.py", label.LabelConfig), ("evaluate.py", evaluate.EvaluateConfig),
                        ("calibrate.py", calibrate.CalibrateConfig), ("profilebench.py", profilebench.WorldArgs),
                        ("predict.py", predict.PredictConfig), ("plots.py", plots.PlotsConfig),
                        ("study.py", study.StudyConfig)):
        out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            line = next((line for line in lines if line.startswith("  " + flag + " ")), None)
            assert line is not None, f"{script}: {flag} missing from --help"
            assert f.metadata.get("help"), f"{script}: {flag} has no help text"
            assert len(line.split(None, 2)) == 3, f"{script}: {flag}: {line!r}"


def test_help_order_names_every_key_of_the_trainers_once():
    """sft.py and rl.py declare their keys in two classes (their own and trainer.TrainingConfig); HELP_ORDER
    keeps their --help lines in the order a reader meets the keys, so it names every key exactly once."""
    import dataclasses

    import rl
    import sft
    for cls in (sft.SFTConfig, rl.RLConfig):
        assert sorted(cls.HELP_ORDER) == sorted(f.name for f in dataclasses.fields(cls)), cls.__name__


def test_audit_map_names_functions_that_exist():
    """Every `file.py:name` the design doc cites (the audit map formula -> function) is a function, class
    or module-level name of that file: renaming or moving one without the doc fails here."""
    text = open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8").read()
    refs = sorted(set(re.findall(r"`([a-z_]+\.py):([A-Za-z_]\w*)", text)))
    assert len(refs) > 50  # the audit map is there and parsed
    missing = []
    for path, name in refs:
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            missing.append(f"{path} (no such file)")
            continue
        tree = ast.parse(open(full, encoding="utf-8").read())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        if name not in defined:
            missing.append(f"{path}:{name}")
    assert not missing, missing


def test_every_shipped_config_loads_into_its_script_options(tmp_path):
    """configs/sft_*.json and rl_*.json are read by sft.py / rl.py's own option system: an unknown key, a value
    of the wrong type or out of range fails here, not an hour into a run. The check is shown to bite on a typo."""
    sys.path.insert(0, ROOT)
    from common import ConfigError, load_config
    from rl import RLConfig
    from sft import SFTConfig
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))
    assert len(paths) >= 8
    for path in paths:
        cls = {"sft": SFTConfig, "rl": RLConfig}[os.path.basename(path).split("_")[0]]
        cfg, _ = load_config(cls, ["--config", path])
        assert cfg.lr > 0 and cfg.output_dir, path
    bad = tmp_path / "sft_typo.json"
    bad.write_text('{"learning_rate": 0.001}')
    try:
        load_config(SFTConfig, ["--config", str(bad)])
    except ConfigError as e:
        assert "learning_rate" in str(e)
    else:
        raise AssertionError("an unknown key in a config file was accepted")
