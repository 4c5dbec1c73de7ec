"""
The shared base of the stage scripts: plumbing, no Conf-Profile method. Imports nothing of the project.

Reads top to bottom: errors; files (atomic writes, the one JSONL reader); what a resumable output stands
on (a checkpoint's fingerprint, one process per output, strict JSON); configs (a dataclass per
script: JSON file + command-line flags, every value checked); the tokenizer layer (the checkpoint's
own tokenizer, chat template and stop tokens, and the guard that keeps user text from becoming control
tokens); progress. It keeps what three or more scripts use: processes and sharding (torchrun, FSDP2) are
distributed.py's, the trainers' own machinery trainer.py's (the harness) and checkpoint.py's (the
resumable training state).
"""
import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import math
import operator
import os
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
# What a resumable output stands on: the identity of a checkpoint, one process per output, strict JSON


# The files of an HF checkpoint directory that decide what it computes: the architecture, the weights
# (one file or shards and their index), the tokenizer, the chat template, the stop tokens.
CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer.model",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                    "chat_template.jinja", "chat_template.json", "generation_config.json")


def checkpoint_fingerprint(model_dir):
    """The identity of an HF checkpoint directory, to record beside what it produced: {file name: {"bytes":
    size, "sha256": hex digest}} for every top-level file matching CHECKPOINT_FILES. Two folders with the
    same fingerprint hold the same bytes in every file that decides the model's outputs, whatever their
    paths or time stamps, so a resume after the weights were retrained or replaced in place (or a
    tokenizer or chat template swapped) is told apart from one on the same checkpoint; other files
    (metrics, configs of the run that made it, training state) do not count.
    Cost: every byte of those files is read once (streamed, 1 MiB at a time, constant memory): about
    1 s per GB from a warm page cache, a 65 GB teacher a minute or so from disk. A missing folder or a
    folder without config.json or *.safetensors is a FileNotFoundError naming it."""
    require_model_dir(model_dir)
    names = sorted({os.path.basename(p) for pattern in CHECKPOINT_FILES
                    for p in glob.glob(os.path.join(glob.escape(model_dir), pattern)) if os.path.isfile(p)})
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise FileNotFoundError(f"{model_dir}: no {'config.json' if 'config.json' not in names else '*.safetensors'} "
                                "in this directory; expected a Hugging Face checkpoint (config.json, *.safetensors, "
                                "tokenizer files)")
    return {n: {"bytes": os.path.getsize(os.path.join(model_dir, n)), "sha256": file_sha256(os.path.join(model_dir, n))}
            for n in names}


@contextlib.contextmanager
def hold_output(path):
    """Hold the output `path` for this process alone while the block runs: an exclusive OS lock
    (fcntl.flock) on the sidecar <path>.lock. A second process asking for the same path, while the first
    holds it, gets at once a ValueError naming the path and the holder's pid (two runs appending to one
    resumable output would write every user twice). The kernel drops the lock when the holder exits or
    is killed, SIGKILL included, so a killed run never blocks the next one; the lock file is removed on
    the way out of the block (a killed holder leaves it behind, and the next run takes it over). Works
    where flock does: local file systems, and NFS on Linux. Without fcntl (Windows) nothing is held."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no OS lock to take
        yield
        return
    lock = f"{path}.lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            words = os.read(fd, 32).decode("ascii", "replace").split()
            holder = words[0] if words and words[0].isdigit() else "unknown"  # the holder writes its pid there
            os.close(fd)
            raise ValueError(f"{path}: in use by another run (pid {holder}, holding {os.path.basename(lock)}); "
                             "expected one process per output: wait for it to end, or choose another output") from None
        try:  # the file we locked must still be the one at `lock`: a holder that just left removed it
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # (removed by hand meanwhile: nothing to remove)
            os.unlink(lock)  # while still holding it: whoever locks the file at `lock` next holds the output
        os.close(fd)


def loads_strict(text):
    """json.loads, refusing what a strict reader refuses (iter_jsonl's strict=True): a key repeated within
    one object, NaN, Infinity, a number that overflows (a DataError saying which)."""
    return json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant,
                      parse_float=_finite_float)


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
    order = getattr(cls, "HELP_ORDER", ())  # keys declared over several classes, in the order --help lists them
    for f in sorted(dataclasses.fields(cls), key=lambda f: order.index(f.name) if f.name in order else len(order)):
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
# Tables: shares written as percentages (the study's and the budget's markdown)


def pct(x):
    """A share as a percentage with two decimals (0.6543 -> '65.43'); '–' for None."""
    return "–" if x is None else f"{100 * x:.2f}"


def sgn(x):
    """A difference of shares in signed points (0.0087 -> '+0.87'); '–' for None."""
    return "–" if x is None else f"{100 * x:+.2f}"


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
