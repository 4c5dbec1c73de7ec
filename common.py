"""
The shared base of the stage scripts: plumbing, no Conf-Profile method. Imports nothing of the project.

Reads top to bottom: errors; files (atomic writes, the one JSONL reader); configs (a dataclass per
script: JSON file + command-line flags, every value checked); the tokenizer layer (the checkpoint's
own tokenizer, chat template and stop tokens, and the guard that keeps user text from becoming control
tokens); processes and devices (torchrun); sharded data parallel (FSDP2); the optimiser and schedule;
resumable training state (safetensors + JSON, never a pickle; one file set per rank when sharded), what
produced a run, and the metrics log.
"""
import contextlib
import dataclasses
import errno
import gc
import hashlib
import json
import math
import operator
import os
import random
import re
import secrets
import shutil
import sys
import textwrap
import time
import weakref

try:
    import fcntl  # POSIX: the lock that tells a live writer's temp file from a killed one's
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch
import torch._dynamo  # noqa: F401  before any process group exists: see cleanup_distributed
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Errors: what a user can act on (file, line, field, what was expected)


class DataError(ValueError):
    """A malformed input: the message names the file, the line, the field and what was expected."""


class ConfigError(ValueError):
    """A bad option value: the message names the key and what was expected."""

# -----------------------------------------------------------------------------
# Files: atomic writes, JSONL


def atomic_write_text(path, text):
    """Write a whole file atomically (see atomic_writer)."""
    with atomic_writer(path) as f:
        f.write(text)


def atomic_write_bytes(path, data):
    """atomic_write_text for bytes (a PNG, say)."""
    with atomic_writer(path, binary=True) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_writer(path, binary=False):
    """Write a file atomically as a stream: yields a text file (UTF-8; bytes with binary=True) open on a
    temp file in the same folder; on success fsync, rename over `path`, fsync the folder; on an error
    the temp file is removed and `path` is left as it was. The file gets the mode a plain open() gives
    (0666 minus the umask), not mkstemp's private 0600. Memory does not grow with what is written.

    A killed process cannot remove its temp file, so each write first removes the temp files of earlier
    writes of the same `path` that no live process holds (remove_stale_temps): what a kill leaves
    behind lasts until the next write of that file, not forever."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    with unwritable_as_data_error(path):
        os.makedirs(folder, exist_ok=True)
        remove_stale_temps(folder, name)
        fd, tmp = _create_temp(folder, name)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            yield f
            with unwritable_as_data_error(path):
                f.flush()
                os.fsync(f.fileno())
                os.replace(tmp, path)  # while the temp is still open, hence locked (remove_stale_temps)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def unwritable_as_data_error(path):
    """Inside the block, an OSError that says the output `path` cannot be written (permission denied, a
    read-only file system, a full disk or quota) becomes one DataError naming `path` and the reason, which
    every script's error exit prints as one line; any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        where = "" if e.filename in (None, path) else f" ({e.filename})"
        raise DataError(f"{path}: cannot write it: {e.strerror}{where}; expected a writable folder with room "
                        "for it") from None


TEMP_PREFIX = ".tmp-"  # + 12 hex digits + "-" + the target's name: atomic_writer's temp files


def _create_temp(folder, name):
    """(fd, path) of a new file `.tmp-<12 hex digits>-<name>` in `folder`, created with mode 0666 & ~umask
    and held under an exclusive lock (flock) for as long as it is open: the mark of a live writer. A
    cleaner that removed the name between the creation and the lock is seen (the name no longer leads
    to this file) and the temp made again."""
    while True:
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(6)}-{name}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner looks at it
        if _same_file(tmp, fd):
            return fd, tmp
        os.close(fd)


def _same_file(path, fd):
    """Whether the name `path` still leads to the open file `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def remove_stale_temps(folder, name):
    """Remove the temp files of atomic writes of `name` in `folder` whose writer is gone: those that
    can be locked (a live writer holds the lock of its temp until its rename; the OS releases it when a
    process dies, killed or not). Returns the paths removed. Temps of other files are left alone, and
    so is everything where flock is not available."""
    if fcntl is None:
        return []
    pattern = re.compile(re.escape(TEMP_PREFIX) + "[0-9a-f]{12}-" + re.escape(name) + r"\Z")
    removed = []
    try:
        entries = [e.name for e in os.scandir(folder) if pattern.match(e.name)]
    except OSError:
        return removed
    for entry in entries:
        tmp = os.path.join(folder, entry)
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:  # gone already, or not ours to read
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(tmp, fd):
                os.unlink(tmp)
                removed.append(tmp)
        except OSError:  # locked: a live writer's
            pass
        finally:
            os.close(fd)
    return removed


def fsync_file(path):
    """Flush a file that someone else wrote (safetensors, torch) from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp, path):
    """Put the finished folder `tmp` in the place of `path`: the old one is renamed aside, `tmp` renamed
    in, the parent fsynced, the old one removed. A crash at any moment leaves `path` old or new whole
    (or `path`.old beside a missing `path`, which the readers of training states look for)."""
    old = path + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(folder):
    """Make renames and new files in `folder` durable (a crash right after a rename may otherwise lose it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows: directories cannot be opened; nothing to do
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync directories
    finally:
        os.close(fd)


def dumps_line(record):
    """One JSONL line; Unicode (e.g. Chinese) is written as is, never \\u-escaped."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path, records):
    """Write a whole JSONL file atomically, one record at a time (`records` may be a generator)."""
    with atomic_writer(path) as f:
        for r in records:
            f.write(dumps_line(r))


def append_jsonl(f, record):
    """Append one complete line to an open file and flush it, so a killed run leaves whole lines only."""
    f.write(dumps_line(record))
    f.flush()
    os.fsync(f.fileno())


def iter_jsonl(path, expected="one JSON object per line", strict=False, offsets=False):
    """Yield (lineno, "file:line", record) for every non-blank line of a JSONL file: the one reader
    behind the pipeline's JSONL inputs (users, teacher samples, predictions, prompts, SFT chats). A
    leading BOM is skipped; invalid UTF-8 or JSON is a DataError naming file, line and column, and so
    are what json.loads accepts but nothing downstream can use: nesting deeper than Python's recursion
    limit, integers of more than 4,300 digits, and lone UTF-16 surrogates ("\\ud800", half of a pair
    split by a JavaScript exporter: such a string cannot be written back as UTF-8).
    strict: a key repeated within one object, NaN, Infinity or a number that overflows to infinity
    (1e999) is an error too (user records, predictions).
    offsets: yield (lineno, "file:line", record, byte offset of the line) instead, so that a caller can
    index a big file and read a record again later (read_jsonl_at) rather than hold them all."""
    hooks = dict(object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant,
                 parse_float=_finite_float) if strict else {}
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\n")  # columns within the line
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start}; expected UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line, **hooks)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}; expected {expected}") from None
            except DataError as e:  # from the strict hooks
                raise DataError(f"{where}: {e}") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply; expected {expected}") from None
            except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
                raise DataError(f"{where}: invalid JSON value: {e}; expected {expected}") from None
            if _SURROGATE_ESCAPE.search(line):  # only an escape can make one: UTF-8 bytes cannot
                field = _surrogate_field(record)
                if field is not None:
                    raise DataError(f"{where}: {field}: lone UTF-16 surrogate in a string (half of a pair, as some "
                                    "JavaScript exports write); expected valid Unicode text")
            yield (lineno, where, record, start) if offsets else (lineno, where, record)


def read_json(path, expected="a JSON object", strict=False):
    """A whole JSON file (a config, a checkpoint's config.json, an index): invalid UTF-8 or JSON, nesting
    deeper than Python's recursion limit, or an integer of more than 4,300 digits is a DataError naming
    the file (line and column where json names them) and what was `expected`, never a traceback.
    strict: a repeated key, NaN, Infinity or a number that overflows to infinity is an error too."""
    hooks = dict(object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant,
                 parse_float=_finite_float) if strict else {}
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8-sig"), **hooks)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}; expected UTF-8 text with {expected}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON at column {e.colno}: {e.msg}; expected {expected}") from None
    except DataError as e:  # from the strict hooks
        raise DataError(f"{path}: {e}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply; expected {expected}") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"{path}: invalid JSON value: {e}; expected {expected}") from None


def read_jsonl_at(f, offset):
    """The record on the line at byte `offset` of a JSONL file open in binary mode (an offset that
    iter_jsonl(..., offsets=True) gave: the line was validated then, so it is only decoded here)."""
    f.seek(offset)
    return json.loads(f.readline().decode("utf-8-sig"))  # -sig: the first line may start with a BOM


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_field(value, path=""):
    """The path ("behavior.watched[2]") of the first key or string holding a lone surrogate, or None.
    Iterative: the record may be nested as deep as json.loads allows."""
    stack = [(value, path)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "(the line)"
        elif isinstance(value, dict):
            for k in value:
                if _SURROGATE.search(k):
                    return f"{path}.{k!r}" if path else repr(k)
            stack.extend((v, f"{path}.{k}" if path else k) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None


def _reject_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise DataError(f"{k}: duplicate key in one object; expected each key once")
    return dict(pairs)


def _reject_constant(name):
    raise DataError(f"invalid JSON number {name}; expected a finite number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise DataError(f"JSON number {text[:20]} overflows to infinity; expected a finite number")
    return value


def file_sha256(path):
    """The sha256 of a file's bytes (hex): its identity whatever its name or time stamps."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

# -----------------------------------------------------------------------------
# Configs


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object",
               list: "a JSON list"}
_BOUNDS = {"min": (operator.ge, ">="), "gt": (operator.gt, ">"), "max": (operator.le, "<="), "lt": (operator.lt, "<")}


def _field_type(field):
    """int, float, bool, str, dict or list: the JSON type of a config field, from its annotation."""
    t = field.type
    if isinstance(t, str):  # `from __future__ import annotations` style
        t = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "list": list}.get(t.split("|")[0].strip())
    return getattr(t, "__origin__", t)  # list[str] -> list


def opt(default, help, **limits):
    """A config field: its default, the one line `--help` prints for it, and its limits, which
    check_fields enforces: min / max (inclusive), gt / lt (exclusive), choices, pattern (a regex the
    whole string must match; describe: how to say it), nonempty, items (a list's item type)."""
    meta = {"help": help, **limits}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_fields(config, where="config", limits=None):
    """Check every field of a config dataclass on creation (from a JSON file, flags or code), so a bad
    value is one ConfigError naming its key, never a TypeError or ZeroDivisionError deep inside a run.

    The type comes from the field's annotation: int (a JSON integer, not true/false), float (an integer
    is accepted and becomes a float; NaN and infinities are not), bool, str, dict, list. The limits come
    from each field's metadata (opt), `limits` {key: {...}} adds to them: min / max (inclusive), gt / lt
    (exclusive), choices (of a list: of each item), pattern (a regex the whole string must match), nonempty,
    items (the type of a list's elements). A key of `limits` that is not a field, or a field of another type, is a
    programming error (an AssertionError in every test)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    limits = limits or {}
    unknown = sorted(set(limits) - set(fields))
    if unknown:
        raise AssertionError(f"{where}: limits for unknown key(s) {unknown}")
    for key, field in fields.items():
        value, kind = getattr(config, key), _field_type(field)
        rule = {**field.metadata, **limits.get(key, {})}
        if kind not in _TYPE_NAMES:
            raise AssertionError(f"{where}: {key}: annotation {field.type!r}; expected one of int, float, bool, str, "
                                 "dict, list (what a JSON config holds)")
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
            setattr(config, key, value)
        if not ok:
            raise ConfigError(f"{where}: {key}: expected {_TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__})")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{where}: {key}: expected a finite number, got {value!r}")
        bounds = [(_BOUNDS[op], rule[op]) for op in _BOUNDS if op in rule]
        if any(not holds(value, b) for (holds, _), b in bounds):
            raise ConfigError(f"{where}: {key}: expected {' and '.join(f'{sign} {b}' for (_, sign), b in bounds)}, "
                              f"got {value!r}")
        if "choices" in rule and kind is list:
            if any(v not in rule["choices"] for v in value):
                raise ConfigError(f"{where}: {key}: expected a list of items among {list(rule['choices'])}, got {value!r}")
        elif "choices" in rule and value not in rule["choices"]:
            raise ConfigError(f"{where}: {key}: expected one of {list(rule['choices'])}, got {value!r}")
        if "pattern" in rule and not re.fullmatch(rule["pattern"], value):
            raise ConfigError(f"{where}: {key}: expected {rule.get('describe', rule['pattern'])}, got {value!r}")
        if rule.get("nonempty") and not value:
            raise ConfigError(f"{where}: {key}: expected a non-empty {'string' if kind is str else 'value'}, got {value!r}")
        if "items" in rule and not all(isinstance(v, rule["items"]) for v in value):
            raise ConfigError(f"{where}: {key}: expected a list whose items are {rule['items'].__name__}, got {value!r}")


DEVICE = {"pattern": r"auto|cpu|cuda(:\d+)?|mps", "describe": "auto, cpu, cuda, cuda:N or mps"}


def _coerce(value, field_type, key):
    """Turn a command-line string into the type of the dataclass field."""
    flag = "--" + key.replace("_", "-")
    if field_type is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{flag}: expected true/false, got {value!r}")
    if field_type in (int, float):
        try:
            return field_type(value)
        except ValueError:
            raise ConfigError(f"{flag}: expected {field_type.__name__}, got {value!r}") from None
    if field_type in (list, dict):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"{flag}: expected JSON, got {value!r}") from None
    return value


def config_help(cls, prog, description="", default_config=None):
    """The --help text of a config class: one line per option, its help, default and limits."""
    lines = [f"usage: python {prog} [--config FILE.json] [--key value ...]", ""]
    if description:
        lines += [description.strip(), ""]
    lines.append("options (a flag overrides the --config file, which overrides the default):")
    rows = [("--config FILE.json", "JSON object of option values (the keys below, with underscores)"
             + (f" [{os.path.relpath(default_config)}]" if default_config else ""))]
    for f in dataclasses.fields(cls):
        kind = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meta = dict(f.metadata)
        limits = [f"{sign} {meta[op]}" for op, (_, sign) in _BOUNDS.items() if op in meta]
        if "choices" in meta:
            limits.append("|".join(map(str, meta["choices"])))
        if "describe" in meta:
            limits.append(meta["describe"])
        metavar = {bool: "[BOOL]", int: "INT", float: "FLOAT", str: "STR", dict: "JSON", list: "JSON"}[kind]
        text = meta.get("help", "") + f" [{json.dumps(default, ensure_ascii=False)}" + (
            f"; {', '.join(limits)}]" if limits else "]")
        rows.append((f"--{f.name.replace('_', '-')} {metavar}", text))
    width = max(len(r[0]) for r in rows) + 2
    columns = max(60, shutil.get_terminal_size((110, 24)).columns - 2 - width)
    for flag, text in rows:
        wrapped = textwrap.wrap(text, columns) or [""]
        lines.append(f"  {flag:<{width}}{wrapped[0]}")
        lines += [" " * (width + 2) + more for more in wrapped[1:]]
    return "\n".join(lines)


def load_config(cls, argv=None, default_config=None, prog=None, description=""):
    """Build config dataclass `cls` from defaults < JSON file (--config or default_config) < --key value flags:
    the one command-line system of every script.

    Flags are the field names in kebab case (`--max-steps`; `--max_steps` works too); `--flag` alone
    sets a boolean; dict / list values are JSON. Unknown keys (in the file or on the command line) are
    an error listing the valid ones; keys of the file that start with "_" are comments. `--help`
    prints config_help and exits. Returns (config, list_of_positional_args)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = ", ".join(sorted(fields))
    config_path, overrides, positional = default_config, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(config_help(cls, prog or os.path.basename(sys.argv[0]), description, default_config))
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
            if _field_type(fields[key]) is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            else:
                if nxt is None:
                    raise ConfigError(f"--{key.replace('_', '-')}: missing value")
                value = nxt
                i += 1
        overrides[key] = _coerce(value, _field_type(fields[key]), key)
        i += 1

    values = {}
    if config_path:
        try:
            values = read_json(config_path, "a JSON object of config keys")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {config_path}") from None
        except DataError as e:
            raise ConfigError(str(e)) from None
        if not isinstance(values, dict):
            raise ConfigError(f"{config_path}: expected a JSON object of config keys")
        values = {k: v for k, v in values.items() if not k.startswith("_")}  # "_comment" keys are notes
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{config_path}: unknown key(s) {unknown}; valid keys: {valid}")
    values.update(overrides)
    return cls(**values), positional


def run_cli(main, prog, argv=None):
    """Run a script's main(argv): a mistake of the user's (a bad option or input value, a malformed or
    missing file, a checkpoint without a tensor) ends it with one line `prog: error: ...` and exit
    status 1, not a traceback. (DataError and ConfigError are ValueErrors.)"""
    try:
        return main(argv)
    except (ValueError, OSError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"{prog}: error: {message}")


def save_config(config, out_dir, name="config.json", extra=None):
    """Save the resolved config next to the outputs it produced. `extra` keys should start with "_"
    (e.g. "_inputs": the input files' fingerprints): load_config skips those, so the file stays a config."""
    values = {**dataclasses.asdict(config), **(extra or {})}
    atomic_write_text(os.path.join(out_dir, name), json.dumps(values, indent=2, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# Tokenizer layer: the checkpoint's own tokenizer and chat template


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>",
                      "<|end|>")


def load_tokenizer(path):
    """The checkpoint's own tokenizer (transformers.AutoTokenizer), from local files only."""
    from transformers import AutoTokenizer  # here: transformers takes seconds to import, and only this needs it

    require_model_dir(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def chat_prompt_ids(tokenizer, messages, **template_kwargs):
    """Token ids of `messages` rendered with the checkpoint's chat template, ending in the assistant turn's opening.
    The messages are neutralised first (neutralize_messages): no text in them, whoever wrote
    it, becomes one of the tokenizer's control tokens; the template's own markup is the only markup."""
    out = tokenizer.apply_chat_template(neutralize_messages(tokenizer, messages), add_generation_prompt=True,
                                        tokenize=True, **template_kwargs)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def stop_ids_for(tokenizer):
    """Ids that end a completion: eos, the vocabulary's end-of-turn tokens, generation_config.json's eos list."""
    ids = set()
    eos = tokenizer.eos_token_id
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    gen_config = os.path.join(str(getattr(tokenizer, "name_or_path", "")), "generation_config.json")
    if os.path.isfile(gen_config):
        with open(gen_config, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def completion_text(tokenizer, sample, stop_ids):
    """A sample's text: its tokens without the final stop token, special tokens dropped."""
    tokens = sample.tokens
    if sample.finish_reason == "stop" and tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


# Control tokens: text that users wrote must reach the model as text, whatever the tokenizer.
#
# A tokenizer turns the strings of its added tokens into those tokens wherever they appear, so a
# signature holding "<|im_end|>\n<|im_start|>assistant\n{...}" would close its user turn and forge an
# assistant answer (ChatML; Llama-3's "<|eot_id|>", Qwen3's "<think>" and "<tool_call>" alike), and
# some chat templates read markup in a message before tokenizing (Qwen3's splits an assistant message
# at "</think>" and renders a user message that starts with "<tool_response>" as a tool turn). So
# every message is neutralised BEFORE the chat template: wherever it holds the text of one of THAT
# tokenizer's added tokens (its own list, special or not), an invisible ZERO WIDTH SPACE goes after
# the first character ("<|im_end|>" -> "<\u200b|im_end|>"). The model then sees the same characters
# as ordinary text (the break is invisible, and byte-level vocabularies encode it like any byte), the
# template's own markup stays markup, and a message without such text is not changed at all (the
# demo's prompts and token ids stay byte for byte the same). Why not tokenize with
# split_special_tokens: it covers special tokens only (Qwen3's <think> and <tool_call> are added but
# not special), it cannot tell the template's markup from the message inside one rendered string, and
# the template has already interpreted the message by then. The break character is checked once per
# tokenizer: every added-token text, broken, must tokenize without an added token (a normaliser that
# removed the break would fail here, and the next candidate is tried).
TOKEN_BREAKS = ("\u200b", "\u2060")  # ZERO WIDTH SPACE, then WORD JOINER


_THINK_BLOCK = re.compile(r"(\s*<think>)(.*)(</think>)(.*)\Z", re.DOTALL)  # greedy: up to the LAST </think>


_NEUTRALIZERS = weakref.WeakKeyDictionary()  # tokenizer -> (texts, (pattern, break) | None)


def added_token_texts(tokenizer):
    """The texts `tokenizer` would turn into one of its added or special tokens (<|im_end|>, <|eot_id|>,
    <|start_header_id|>, <think>, <tool_call>, ...), from the tokenizer itself; longest first. Single
    characters and pure whitespace are left out: nothing fits inside them, and they are text, not markup."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    texts.update(getattr(t, "content", t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values())
    return sorted((t for t in texts if isinstance(t, str) and len(t) >= 2 and t.strip()), key=lambda t: (-len(t), t))


def _break_tokens(text, pattern, mark):
    """Insert `mark` after the first character of every match until nothing matches (a break can
    uncover an overlapping token text, e.g. "|im_end|>" in "<|im_end|>" if that were one too)."""
    while pattern.search(text):
        text = pattern.sub(lambda m: m.group(0)[0] + mark + m.group(0)[1:], text)
    return text


def _neutralizer(tokenizer):
    """(pattern of the tokenizer's added-token texts, break character), or None when it has none."""
    texts = tuple(added_token_texts(tokenizer))
    try:
        cached = _NEUTRALIZERS.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        cached = None
    if cached is not None and cached[0] == texts:
        return cached[1]
    found = None
    if texts:
        pattern = re.compile("|".join(map(re.escape, texts)))
        ids = set(tokenizer.convert_tokens_to_ids(list(texts)))
        for mark in TOKEN_BREAKS:
            encoded = tokenizer([_break_tokens(t, pattern, mark) for t in texts], add_special_tokens=False)["input_ids"]
            if not ids & {i for seq in encoded for i in seq}:
                found = (pattern, mark)
                break
        else:
            raise ValueError(f"{getattr(tokenizer, 'name_or_path', '') or 'tokenizer'}: no break character in "
                             f"{[hex(ord(c)) for c in TOKEN_BREAKS]} keeps its added-token texts from becoming "
                             "tokens (does its normaliser remove them?); cannot render user text safely")
    try:
        _NEUTRALIZERS[tokenizer] = (texts, found)
    except TypeError:
        pass
    return found


def neutralize_text(tokenizer, text):
    """`text` with every added-token text of `tokenizer` broken by an invisible character (see above)."""
    found = _neutralizer(tokenizer)
    return text if found is None else _break_tokens(text, *found)


def neutralize_messages(tokenizer, messages):
    """Chat messages as they go into `tokenizer`'s chat template: every string field (content, role,
    ...) neutralised, so no text in them becomes a control token. One exception keeps reasoning
    answers trainable: an assistant message that starts with a "<think>...</think>" block keeps those
    two tags as the template expects them (what is between and after them is neutralised, inner
    "</think>" too). Messages without any added-token text are returned unchanged."""
    found = _neutralizer(tokenizer)
    if found is None:
        return messages
    pattern, mark = found
    out = []
    for message in messages:
        if isinstance(message, dict) and any(isinstance(v, str) and pattern.search(v) for v in message.values()):
            message = dict(message)
            for key, value in message.items():
                if not isinstance(value, str):
                    continue
                think = _THINK_BLOCK.match(value) if key == "content" and message.get("role") == "assistant" else None
                if think:
                    message[key] = (think[1] + _break_tokens(think[2], pattern, mark) + think[3]
                                    + _break_tokens(think[4], pattern, mark))
                else:
                    message[key] = _break_tokens(value, pattern, mark)
        out.append(message)
    return out


def require_model_dir(path):
    """A clear FileNotFoundError when a checkpoint directory is missing (transformers would otherwise
    take the path for a Hub repo id and complain about its form). Nothing is ever downloaded."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: model directory not found; expected a local Hugging Face checkpoint "
                                "directory (config.json, *.safetensors, tokenizer files)")

# -----------------------------------------------------------------------------
# Progress that reads well in a terminal and in a log file

PROGRESS_EVERY_S = 30.0  # seconds between progress lines when the output is a log file, not a terminal


class Progress:
    """Progress of a long loop. On a terminal a tqdm bar; when stderr goes to a file (a log, a CI run,
    the pipeline's stages under nohup) one concise line every PROGRESS_EVERY_S seconds and one at the
    end, instead of a bar redrawn several times a second. update(n), set_postfix_str(s), close(), and
    `total` may be lowered while it runs (generate() does, as rows stop early)."""

    def __init__(self, total, desc, unit="it", initial=0, disable=False, every=PROGRESS_EVERY_S):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, initial, ""
        self.disable, self.every = disable, every
        self.bar = None
        if not disable and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "tok",
                            dynamic_ncols=True)
        self.t0 = self.t_last = time.time()
        self.n0 = initial

    def update(self, n=1):
        self.n += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.update(n)
        elif not self.disable and time.time() - self.t_last >= self.every:
            self._line()

    def set_postfix_str(self, text):
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def _line(self):
        self.t_last = time.time()
        elapsed = self.t_last - self.t0
        rate = (self.n - self.n0) / max(elapsed, 1e-9)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total}{share} {rate:.3g} {self.unit}/s {elapsed:.0f}s"
              + (f" {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()
            self.bar.close()
        elif not self.disable:
            self._line()


# -----------------------------------------------------------------------------
# Processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK) and devices


def setup_distributed():
    """Init the process group when launched by torchrun. Returns (rank, world_size, local_rank, device)."""
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, local_rank, device


def cleanup_distributed():
    """Destroy the process group so that its gloo worker threads are joined while Python is alive.

    Why it matters: a gloo worker thread drops its reference to a finished collective (and to the
    tensors it holds) only after the caller's wait() has returned, and dropping a tensor that has a
    Python object takes the GIL. If the interpreter is already finalising by then, the thread cannot
    take the GIL: it exits inside a C++ destructor and the process dies with "terminate called without
    an active exception" (SIGABRT; about one torchrun run in ten on a busy 2-core machine). Joining the
    workers here rules that out -- but destroy_process_group only frees the group if nothing else
    holds it, and torch.distributed.nn.functional does: its functions take `group=group.WORLD` as a
    default argument, evaluated when the module is imported. torch._dynamo imports it, and the first
    optimizer torch builds imports torch._dynamo; after init_process_group that pinned the group for
    good. So this file imports torch._dynamo at its top, before any group exists (the defaults are then
    None), and gc.collect() frees what waits in reference cycles (a DistributedDataParallel wrapper)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t):
    """Sum a tensor over all processes (in place; a no-op in one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier():
    if is_distributed():
        dist.barrier()


def unwrap(model):
    """The bare Transformer inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


# Sharded data parallel (`parallel: fsdp`): FSDP2 (torch.distributed.fsdp.fully_shard). Each rank keeps
# 1/world_size of every parameter, gradient and AdamW moment (dim-0 shards, DTensors); a layer's full
# weights exist only while it runs (all-gathered before its forward and again in backward, freed after),
# and backward reduce-scatters each gradient to its shard. Gradients are SUMMED over ranks (each rank's
# loss is its share of the global loss, as with rl.py's DDP all-reduce): FSDP2's default averages
# with ReduceOp.AVG, which gloo has been reported to sum instead (pytorch issue 162338), so only SUM
# reductions are used and nothing is divided. Every rank must run the same number of sharded forwards
# and backwards (each one is a collective): callers pad uneven work with dummy micro-batches, and
# generation, whose decode steps differ per rank, runs inside full_parameters().


PARALLEL = ("ddp", "fsdp")


def shard_model(model, device):
    """FSDP2 in place: fully_shard each decoder layer (one all-gather per layer), then the root (the
    embedding, final norm and lm_head, tied or not). Gradients are reduced with SUM and not divided.
    Returns the model (now an FSDPModule; its parameters are DTensors)."""
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)  # its full weights are freed after its forward, gathered again in backward
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # the root's weights are needed first in backward
    for module in fsdp_modules(model):
        module.set_force_sum_reduction_for_comms(True)
        module.set_gradient_divide_factor(1.0)
    return model


def fsdp_modules(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model):
    """Free the full parameters of a sharded model, leaving its shards registered: a forward without
    backward (eval, no_grad) leaves the root's gathered, and a state dict must see the shards."""
    for m in fsdp_modules(model):
        m.reshard()


def is_sharded(model):
    """True when `model` was sharded by shard_model (FSDP2)."""
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_parameters(model):
    """Inside: every rank holds the full parameters of a sharded model (one all-gather per layer on entry,
    freed on exit), so forwards run without collectives: the sampler decodes a different number of steps
    on each rank, and rank 0 alone runs the evaluations. Every rank must enter it. Not sharded: nothing."""
    modules = fsdp_modules(model)
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in modules:
            m.set_reshard_after_forward(m is not model, recurse=False)  # as shard_model set them
            m.reshard()


def full_state_dict(model, rank=0):
    """The model's state dict with full tensors on the CPU on rank 0 (None elsewhere). Sharded: every rank
    must call it (each tensor is all-gathered); tied weights are gathered once."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()} if rank == 0 else None
    reshard(model)
    gathered, out = {}, {}
    for name, value in model.state_dict().items():
        if id(value) not in gathered:
            full = value.full_tensor() if isinstance(value, DTensor) else value
            gathered[id(value)] = full.detach().cpu() if rank == 0 else None
        out[name] = gathered[id(value)]
    return out if rank == 0 else None


def clip_gradients(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ for plain and sharded (DTensor) gradients: the global norm before
    clipping (a float; the norm of sharded gradients is summed over ranks), and the gradients scaled
    to at most max_norm (0 = off)."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.item()


def autocast_for(device):
    """bf16 autocast on CUDA (fp32 master weights stay fp32); fp32 on CPU, where bf16 matmuls are slow."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup_run(config_class, argv, default_config, prog, description=""):
    """Shared start of sft.py and rl.py: strict config, process group (under torchrun), device."""
    cfg, positional = load_config(config_class, argv, default_config, prog, description)
    if positional:
        raise ConfigError(f"unexpected argument(s) {positional}; use --key value (see --help)")
    rank, world_size, local_rank, device = setup_distributed()
    if cfg.device != "auto" and world_size == 1:
        device = torch.device(cfg.device)
    return cfg, rank, world_size, local_rank, device

# -----------------------------------------------------------------------------
# Optimiser and schedule


def lr_at(step, cfg, total_steps=None):
    """Learning rate at 0-based optimizer step: linear warmup to cfg.lr over warmup_steps, then cosine
    decay to cfg.lr * min_lr_ratio at the last step."""
    total = total_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - 1 - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def stochastic_round_to_bf16(x):
    """fp32 -> bf16, rounding up or down at random with probability proportional to the distance
    (unbiased: E[round(x)] = x). bf16 keeps the top 16 bits of an fp32; adding uniform noise to the
    16 dropped bits before truncating rounds up exactly with the probability of the dropped fraction."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 parameters (big models on one GPU: no fp32 master copy). Moments are kept in bf16,
    the step is computed in fp32 and written back with stochastic rounding. Why: with round-to-nearest,
    an update smaller than half a bf16 step is lost (lr 1e-5 vs a step of ~1e-4 for a weight of 0.02),
    so the model would barely move; stochastic rounding is unbiased, so small updates add up."""

    CHUNK = 1 << 24  # elements per fp32 work chunk: bounds the temporaries of huge matrices (embeddings)

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                c1, c2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])  # sharded (FSDP2): this rank's shard
                for w, g, m, v in zip(*(_local(t).view(-1).split(self.CHUNK) for t in tensors)):
                    g32 = g.float()
                    m32 = m.float().lerp_(g32, 1 - b1)
                    v32 = v.float().mul_(b2).addcmul_(g32, g32, value=1 - b2)
                    m.copy_(m32)
                    v.copy_(v32)
                    w32 = w.float().mul_(1 - lr * wd).addcdiv_(m32 / c1, (v32 / c2).sqrt_().add_(eps), value=-lr)
                    w.copy_(stochastic_round_to_bf16(w32))


def _local(t):
    """This rank's part of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def build_optimizer(model, cfg):
    """AdamW (AdamWBF16 for bf16 parameters); weight decay only on matrices (not norm gains or biases)."""
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if params[0].dtype == torch.bfloat16:
        return AdamWBF16(groups, lr=cfg.lr, betas=betas)
    fused = params[0].is_cuda and not isinstance(params[0], DTensor)  # sharded: the foreach kernels
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)

# -----------------------------------------------------------------------------
# Resumable training state: safetensors + JSON only, so resuming never unpickles anything (a pickle
# can run any code when it is loaded); written to a temp dir, fsynced, then renamed into place.
#
#   train_state/model.safetensors       the weights (tied ones once); when some are frozen (LoRA: the
#                                       base), only the trainable ones: the frozen ones are reloaded
#                                       from the run's `model` checkpoint
#   train_state/optimizer.safetensors   every tensor of optimizer.state_dict() ("state.<param>.<key>")
#   train_state/rng.safetensors         torch's (and CUDA's) generator states
#   train_state/state.json              format, step, extra; the optimizer's other state (step counts,
#                                       param_groups); Python's and numpy's RNG states


TRAIN_STATE_FORMAT = 2  # 1: torch.save pickles (model.pt, optimizer.pt, rng.pt), refused when resuming


PICKLE_FILES = ("model.pt", "optimizer.pt", "rng.pt")


def _rng_state():
    """(JSON, tensors): Python's Mersenne Twister (ints), numpy's (uint32 words -> ints), torch's bytes."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(words), gauss], "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    return meta, tensors


def _set_rng_state(meta, tensors):
    version, words, gauss = meta["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _split_optimizer_state(state_dict):
    """optimizer.state_dict() -> (JSON, tensors). A tensor is stored as {"tensor": its safetensors name};
    everything else (AdamWBF16's int step counts, param_groups' hyperparameters) stays JSON."""
    meta, tensors = {"state": {}, "param_groups": []}, {}
    for index, entries in state_dict["state"].items():
        meta["state"][str(index)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
                value = {"tensor": f"state.{index}.{key}"}
            meta["state"][str(index)][key] = value
    for group in state_dict["param_groups"]:
        meta["param_groups"].append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()})
    return meta, tensors


def _join_optimizer_state(meta, tensors):
    """The inverse of _split_optimizer_state (JSON lists in param_groups, e.g. betas, become tuples again)."""
    state = {int(index): {k: tensors[v["tensor"]] if isinstance(v, dict) and set(v) == {"tensor"} else v
                          for k, v in entries.items()} for index, entries in meta["state"].items()}
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_training_state(path, model, optimizer, step, extra=None, made_by=None):
    """Model, optimizer, step, RNG states and `extra` (JSON: data position, ...) in dir `path`, atomically:
    written to path.tmp and fsynced, then renamed, so a kill or a crash at any moment leaves the previous
    state or the new one. `made_by` (JSON, run_record) is stored as is: what produced the state.
    Every rank calls it: rank 0 writes the one copy (ranks hold the same model), or, for a sharded
    model, every rank its shards (save_sharded_training_state)."""
    if is_sharded(model):
        return save_sharded_training_state(path, model, optimizer, step, extra, made_by)
    if is_distributed() and dist.get_rank() != 0:
        return
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    optimizer_meta, optimizer_tensors = _split_optimizer_state(optimizer.state_dict())
    rng_meta, rng_tensors = _rng_state()
    params = dict(unwrap(model).named_parameters())
    trainable = {name: p for name, p in params.items() if p.requires_grad}
    if len(trainable) < len(params):  # LoRA: the adapters only, not a copy of the frozen base
        save_file({k: p.detach().cpu().contiguous() for k, p in trainable.items()}, os.path.join(tmp, "model.safetensors"))
    else:
        save_model(unwrap(model), os.path.join(tmp, "model.safetensors"))  # stores tied weights once
    save_file({k: v.cpu() for k, v in optimizer_tensors.items()}, os.path.join(tmp, "optimizer.safetensors"))
    save_file({k: v.cpu() for k, v in rng_tensors.items()}, os.path.join(tmp, "rng.safetensors"))
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        fsync_file(os.path.join(tmp, name))
    state = {"format": TRAIN_STATE_FORMAT, "step": step, "extra": extra or {}, **(made_by or {}),
             "parameters": "trainable" if len(trainable) < len(params) else "all",
             "optimizer": optimizer_meta, "rng": rng_meta}
    atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(state) + "\n")
    replace_dir(tmp, path)


def read_training_state(path):
    """state.json of a training state dir (JSON only: nothing is loaded yet), after checking that the dir
    is in this version's format. Returns (the dir it was read from, its state dict). A dir that holds
    the old pickles is refused, never loaded: unpickling a crafted file runs any code in it."""
    if not os.path.exists(os.path.join(path, "state.json")) and os.path.exists(os.path.join(path + ".old", "state.json")):
        path = path + ".old"  # killed between the two renames of a save
    pickles = [name for name in PICKLE_FILES if os.path.exists(os.path.join(path, name))]
    if pickles:
        raise ValueError(f"{path}: holds {', '.join(pickles)}: pickle files (an older version's training state, or "
                         "planted); resuming never unpickles anything, since a crafted pickle runs code when loaded. "
                         f"Delete {path} to start afresh, or resume with the version that wrote it")
    if not os.path.exists(os.path.join(path, "state.json")):
        raise FileNotFoundError(f"{path}: no training state to resume from (expected state.json, model.safetensors, "
                                "optimizer.safetensors, rng.safetensors)")
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}/state.json: unreadable ({e}); expected the JSON that save_training_state writes") from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"{path}/state.json: format {found!r}; expected {TRAIN_STATE_FORMAT} (this version's "
                         "safetensors + JSON training state)")
    return path, state


def load_training_state(path, model, optimizer):
    """Restore what save_training_state wrote (and RNG states); returns (step, extra)."""
    if is_sharded(model):
        return load_sharded_training_state(path, model, optimizer)
    path, state = read_training_state(path)
    if "tensors" in state:
        raise ValueError(f"{path}: a sharded state (one file set per rank); it loads only into the layout that "
                         f"wrote it ({state.get('layout')})")
    device = next(unwrap(model).parameters()).device
    if state.get("parameters") == "trainable":  # LoRA: the state holds the adapters; the base is loaded already
        tensors = load_file(os.path.join(path, "model.safetensors"), device=str(device))
        trainable = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
        if set(tensors) != set(trainable):
            diff = sorted(set(tensors) ^ set(trainable))
            raise ValueError(f"{path}/model.safetensors: holds trainable tensors {len(tensors)}, the model has "
                             f"{len(trainable)} (first difference {diff[:1]}); expected the same adapters")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(tensors[name])
    else:
        load_model(unwrap(model), os.path.join(path, "model.safetensors"), strict=True, device=str(device))
    # on the CPU: load_state_dict moves each tensor where its parameter is (step counts stay on the CPU)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    optimizer.load_state_dict(_join_optimizer_state(state["optimizer"], tensors))
    _set_rng_state(state["rng"], load_file(os.path.join(path, "rng.safetensors")))
    return state["step"], state["extra"]


# A sharded model's training state (parallel: fsdp): every rank writes its own shards, so no rank ever
# holds the whole model, and a resume loads them back into the same layout (same world size).
# torch.distributed.checkpoint is not used: its .metadata file is a pickle, and resuming never unpickles.
#
#   train_state/state.json                  format, step, extra, layout {parallel, world_size}, and the
#                                           index: each tensor's global shape and which rank holds which rows
#   train_state/rank<r>.model.safetensors   rank r's shard (dim-0 rows) of every parameter (tied ones once)
#   train_state/rank<r>.optimizer.safetensors   its shards of the AdamW moments (+ step counts)
#   train_state/rank<r>.rng.safetensors     its generator states (AdamWBF16 rounds its shard with them)
#   train_state/rank<r>.json                its optimizer JSON state and Python / numpy RNG states


def shard_rows(n, world_size, rank):
    """[first, end) of the n dim-0 rows that FSDP2 gives `rank`: chunks of ceil(n / world_size) rows, as
    torch.chunk cuts them (the last ranks may hold fewer, or none)."""
    per = -(-n // world_size)
    return [min(n, rank * per), min(n, (rank + 1) * per)]


def save_sharded_training_state(path, model, optimizer, step, extra=None, made_by=None):
    """save_training_state for a sharded model: every rank writes its files into path.tmp, then rank 0
    writes state.json and renames path.tmp over path (the same atomic swap). Every rank must call it;
    `path` must be on a file system all ranks see."""
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    reshard(model)
    params = dict(unwrap(model).named_parameters())  # shared (tied) parameters appear once
    optimizer_meta, optimizer_tensors = _split_optimizer_state(optimizer.state_dict())
    rng_meta, rng_tensors = _rng_state()
    files = {"model": {k: _local(v).detach() for k, v in params.items()},
             "optimizer": {k: _local(v) for k, v in optimizer_tensors.items()}, "rng": rng_tensors}
    for kind, tensors in files.items():
        name = os.path.join(tmp, f"rank{rank}.{kind}.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, name)
        fsync_file(name)
    atomic_write_text(os.path.join(tmp, f"rank{rank}.json"),
                      json.dumps({"rank": rank, "optimizer": optimizer_meta, "rng": rng_meta}) + "\n")
    dist.barrier()  # every rank's files are in path.tmp before rank 0 renames it
    if rank == 0:
        index = {k: {"shape": list(v.shape), "rows": [shard_rows(v.shape[0], world, r) for r in range(world)]}
                 for k, v in params.items()}
        state = {"format": TRAIN_STATE_FORMAT, "step": step, "extra": extra or {}, **(made_by or {}),
                 "layout": {"parallel": "fsdp", "world_size": world}, "tensors": index}
        atomic_write_text(os.path.join(tmp, "state.json"), json.dumps(state) + "\n")
        replace_dir(tmp, path)
    dist.barrier()


def load_sharded_training_state(path, model, optimizer):
    """Restore this rank's shards written by save_sharded_training_state (same world size); returns
    (step, extra). Every rank must call it."""
    path, state = read_training_state(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = state.get("layout") or {"parallel": "ddp", "world_size": None}
    if "tensors" not in state or layout != {"parallel": "fsdp", "world_size": world}:
        raise ValueError(f"{path}: written with parallel={layout.get('parallel')}, world_size="
                         f"{layout.get('world_size')}; this run is parallel=fsdp, world_size={world}: a sharded "
                         "state loads only into the layout that wrote it")
    reshard(model)
    params = dict(unwrap(model).named_parameters())
    shards = load_file(os.path.join(path, f"rank{rank}.model.safetensors"))
    if set(shards) != set(params):
        raise ValueError(f"{path}/rank{rank}.model.safetensors: tensors {sorted(set(shards) ^ set(params))[:5]} do not "
                         "match the model's")
    with torch.no_grad():
        for name, p in params.items():
            local = _local(p)
            if shards[name].shape != local.shape:
                raise ValueError(f"{path}/rank{rank}.model.safetensors: {name}: shape {tuple(shards[name].shape)}, "
                                 f"expected this rank's shard {tuple(local.shape)}")
            local.copy_(shards[name])
    with open(os.path.join(path, f"rank{rank}.json"), encoding="utf-8") as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(path, f"rank{rank}.optimizer.safetensors"))
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    for name, t in list(tensors.items()):  # state.<param index>.<key>: a moment takes its parameter's layout
        p = by_index[int(name.split(".")[1])]
        if isinstance(p, DTensor) and t.shape == _local(p).shape and t.dim() > 0:
            tensors[name] = DTensor.from_local(t.to(_local(p).device), p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(_join_optimizer_state(meta["optimizer"], tensors))
    _set_rng_state(meta["rng"], load_file(os.path.join(path, f"rank{rank}.rng.safetensors")))
    return state["step"], state["extra"]


# What produced a run. A training state records the resolved config and its input files' size and
# sha256; --resume with other settings or changed data is refused, naming what differs, and a fresh
# run refuses an output_dir that holds another run's resumable state (it would be overwritten, or
# mixed into this run's metrics).


def run_record(cfg, path_keys, inputs):
    """{"config": the resolved config (path keys made absolute, so one file named two ways is one file),
    "inputs": {name: {"path", "bytes", "sha256"}} of each existing input file in `inputs` {name: path}}."""
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for key in path_keys:
        if config.get(key):
            config[key] = os.path.abspath(config[key])
    files = {name: os.path.abspath(path) for name, path in inputs.items() if path and os.path.isfile(path)}
    return {"config": config, "inputs": {name: {"path": path, "bytes": os.path.getsize(path), "sha256": file_sha256(path)}
                                         for name, path in files.items()}}


def record_changes(saved, record, may_change):
    """What differs between a saved run record and this run's, as "key old -> new" strings."""
    if not isinstance(saved.get("config"), dict):
        return ["the state records no settings to compare (written without a run record)"]
    old, new, absent = saved["config"], record["config"], "(absent)"
    diffs = [f"{key} {old.get(key, absent)!r} -> {new.get(key, absent)!r}" for key in sorted(set(old) | set(new))
             if key not in may_change and old.get(key, absent) != new.get(key, absent)]
    old_inputs = saved.get("inputs") or {}
    for name, now in sorted(record["inputs"].items()):
        was = old_inputs.get(name)
        if was is None or (was.get("bytes"), was.get("sha256")) != (now["bytes"], now["sha256"]):
            before = "no file" if was is None else f"{was.get('bytes')} bytes, sha256 {str(was.get('sha256'))[:12]}"
            diffs.append(f"{name} file {now['path']} changed ({before} -> {now['bytes']} bytes, sha256 {now['sha256'][:12]})")
    return diffs


def check_output_dir(cfg, record, may_change, rank=0):
    """Before a run: with --resume, the state in output_dir/train_state must have been made with the same
    settings and input files (except `may_change`; --force-resume goes on with the new ones, saying
    which); without --resume, output_dir must not hold another run's resumable state. A sharded state
    (record["layout"]: parallel fsdp) needs the same parallel mode and world size, even with --force-resume."""
    state_dir = os.path.join(cfg.output_dir, "train_state")
    if not cfg.resume:
        if os.path.exists(state_dir) or os.path.exists(state_dir + ".old"):
            raise ConfigError(f"{state_dir}: holds the resumable state of an unfinished run; add --resume to continue "
                              "it, or delete it (or choose another output_dir) to start afresh")
        return
    path, saved = read_training_state(state_dir)
    old_layout, layout = saved.get("layout") or {"parallel": "ddp"}, record.get("layout")
    if layout and "fsdp" in (old_layout.get("parallel"), layout["parallel"]) and old_layout != layout:
        diffs = [f"{k} {old_layout.get(k)!r} -> {layout[k]!r}" for k in layout if old_layout.get(k) != layout[k]]
        raise ConfigError(f"{path}: a sharded (parallel=fsdp) training state resumes only with the parallel mode and "
                          f"the number of processes that wrote it: {'; '.join(diffs)}")
    diffs = record_changes(saved, record, may_change)
    if diffs and not cfg.force_resume:
        raise ConfigError(f"{path}: made with other settings than this --resume: {'; '.join(diffs)}. Resume with the "
                          "recorded settings, add --force-resume to go on with the new ones, or start afresh in another "
                          "output_dir")
    if diffs and rank == 0:
        print(f"--force-resume: {path} goes on with changed settings: {'; '.join(diffs)}", flush=True)


def open_metrics(path, start_step):
    """metrics.jsonl for appending: a fresh run starts it empty; a resumed one keeps the lines of the
    steps it resumes after (a killed run may have logged steps past its last checkpoint)."""
    kept = []
    if start_step and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
    atomic_write_text(path, "".join(kept))
    return open(path, "a", encoding="utf-8")
