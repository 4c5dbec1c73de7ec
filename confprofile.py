"""
Conf-Profile, the domain core: taxonomy, prompts, answer parsing, confidence-weighted voting,
JSONL I/O with validation, strict config loading. Its CLI runs the whole pipeline (`demo`).

(Skeleton: the sections below are filled in by the profiling-core work.)
"""
import dataclasses
import json
import os
import sys
import tempfile

# -----------------------------------------------------------------------------
# Files: atomic writes, JSONL


def atomic_write_text(path, text):
    """Write a whole file atomically: a temp file in the same folder, fsync, then rename over."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dumps_line(record):
    """One JSONL line; Unicode (e.g. Chinese) is written as is, never \\u-escaped."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path, records):
    """Write a whole JSONL file atomically."""
    atomic_write_text(path, "".join(dumps_line(r) for r in records))


def append_jsonl(f, record):
    """Append one complete line to an open file and flush it, so a killed run leaves whole lines only."""
    f.write(dumps_line(record))
    f.flush()
    os.fsync(f.fileno())


# -----------------------------------------------------------------------------
# Config: a dataclass per script, JSON file + `--key value` overrides, unknown keys rejected


class ConfigError(ValueError):
    pass


def _coerce(value, field_type, key):
    """Turn a command-line string into the type of the dataclass field."""
    if isinstance(field_type, str):  # `from __future__ import annotations` style
        field_type = {"int": int, "float": float, "bool": bool, "str": str}.get(field_type.split("|")[0].strip(), str)
    if field_type is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}: expected true/false, got {value!r}")
    if field_type in (int, float):
        try:
            return field_type(value)
        except ValueError:
            raise ConfigError(f"--{key}: expected {field_type.__name__}, got {value!r}") from None
    if field_type in (list, dict) or getattr(field_type, "__origin__", None) in (list, dict):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"--{key}: expected JSON, got {value!r}") from None
    if value.lower() in ("none", "null") and field_type is not str:
        return None
    return value


def load_config(cls, argv=None, default_config=None):
    """Build config dataclass `cls` from defaults < JSON file (--config or default_config) < --key value flags.

    Unknown keys (in the file or on the command line) are an error listing the valid ones. Keys may
    be written with dashes or underscores (`--max-steps` == `--max_steps`). Boolean flags accept
    `--flag` alone as true. Returns (config, list_of_positional_args).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = ", ".join(sorted(fields))
    config_path, overrides, positional = default_config, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(f"usage: --config FILE.json [--key value ...]\nkeys (default):")
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                print(f"  --{f.name.replace('_', '-'):<28} {default!r}")
            sys.exit(0)
        if not arg.startswith("--"):
            positional.append(arg)
            i += 1
            continue
        key, _, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "config":
            if not value:
                i += 1
                value = argv[i] if i < len(argv) else None
            config_path = value
            i += 1
            continue
        if key not in fields:
            raise ConfigError(f"unknown option --{key.replace('_', '-')}; valid keys: {valid}")
        if not value and "=" not in arg:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if fields[key].type in (bool, "bool") and (nxt is None or nxt.startswith("--")):
                value = "true"
            else:
                if nxt is None:
                    raise ConfigError(f"--{key}: missing value")
                value = nxt
                i += 1
        overrides[key] = _coerce(value, fields[key].type, key)
        i += 1

    values = {}
    if config_path:
        try:
            with open(config_path, encoding="utf-8") as f:
                values = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {config_path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path}: line {e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{config_path}: expected a JSON object of config keys")
        values = {k: v for k, v in values.items() if not k.startswith("_")}  # "_comment" keys are notes
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{config_path}: unknown key(s) {unknown}; valid keys: {valid}")
    values.update(overrides)
    return cls(**values), positional


def save_config(config, out_dir, name="config.json"):
    """Save the resolved config next to the outputs it produced."""
    atomic_write_text(os.path.join(out_dir, name), json.dumps(dataclasses.asdict(config), indent=2, ensure_ascii=False) + "\n")
