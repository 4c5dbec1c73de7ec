"""
Teacher labelling: profile a JSONL of users with any checkpoint (or the simulated teacher), N answers
per user, one line per user; resumable, torchrun-sharded and merged. Also sampling any chat prompts,
and a checkpoint's greedy answers for evaluate.py. The sampling itself is rollout.generate.

    python label.py --teacher DIR|sim --users users.jsonl --samples 8 --out teacher.jsonl \
        [--temperature T --max-new-tokens M --seed S --batch-users U] [--force-resume]
        out line per user {"user_id", "samples": [{"text", "finish_reason"}]}; restartable: the
        settings are recorded in teacher.jsonl.meta.json, and a rerun with other settings is refused
        (naming the keys) unless --force-resume. An --out that is an input, or whose lines are not this
        tool's output, is refused before anything in it changes. Users go in batches of --batch-users
        (in file order); a batch an interrupted run wrote in part is sampled again whole.
    torchrun --nproc_per_node=K label.py --teacher ... (same options): rank r labels batches r, r + K,
        ... into its own shard teacher.jsonl.rank{r}-of{K} (restartable on its own, like --out); when
        every shard is complete, rank 0 merges them into teacher.jsonl, the same bytes as one process
        writes. `--merge` merges complete shards later (e.g. copied from nodes without a shared disk).
    `--samples 1 --temperature 0` gives any checkpoint's greedy predictions for evaluate.py.
    python label.py --model DIR --prompts prompts.jsonl --samples N --max-new-tokens M \
        --temperature T --top-k K --top-p P --seed S --out out.jsonl
        prompts line {"id": ..., "messages": [...]} -> out line {"id": ..., "samples": [{"text", "finish_reason"}]}
    Both: --confidence value|expected|token (how a greedy answer writes its confidence; value = the most
    probable value), --max-batch-tokens (KV-cache budget), --template-kwargs '{"enable_thinking": false}',
    --device, --dtype, --progress false. `python label.py --help` lists every option. The last line printed gives tokens/s.
"""
import contextlib
import dataclasses
import datetime
import functools
import glob
import hashlib
import json
import os
import re
import sys
import time

import torch
import torch.distributed as dist

import profilebench
import rollout
from common import (ConfigError, DEVICE, DataError, Progress, atomic_write_text, atomic_writer, chat_prompt_ids,
                    check_fields, checkpoint_fingerprint, completion_text, dumps_line, file_sha256, hold_output,
                    iter_jsonl, load_config, load_tokenizer, loads_strict, opt, run_cli, stop_ids_for, write_jsonl)
from confprofile import load_taxonomy, read_users, render_prompt
from distributed import all_ranks, before_process_group, cleanup_distributed
from model import check_tokenizer_fits, load_model

# -----------------------------------------------------------------------------
# Input files


def read_prompts(path):
    """Read a prompts JSONL: one {"id": ..., "messages": [{"role", "content"}, ...]} per line.

    Blank lines are skipped; anything else malformed is a ValueError "file:line: field: expected ...".
    """
    records, seen = [], {}
    for lineno, where, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object {{\"id\", \"messages\"}}, "
                             f"got {type(record).__name__}")
        if "id" not in record or not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
            raise ValueError(f"{where}: id: expected a string or integer, got {record.get('id')!r}")
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: messages: expected a non-empty list of {{\"role\", \"content\"}}, "
                             f"got {messages!r:.80}")
        for k, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: messages[{k}]: expected {{\"role\": str, \"content\": str}}, "
                                 f"got {m!r:.80}")
        if record["id"] in seen:
            raise ValueError(f"{where}: id: duplicate {record['id']!r} (first on line {seen[record['id']]}); "
                             "expected unique ids")
        seen[record["id"]] = lineno
        records.append(record)
    return records


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """A resumable one-line-per-user output of ours: what its lines hold and which tool writes them.
    label_users writes it (common.dumps_line), so every line starts with LINE_START."""
    fields: tuple     # the keys every line has: the user id, then the payload
    payload: type     # the payload's JSON type (list or dict)
    what: str         # "teacher output": how errors name a line
    tool: str         # "label.py --teacher": recorded in <out>.meta.json, named in errors


LINE_START = b'{"user_id": '  # how every line label_users writes begins
TEACHER_OUTPUT = OutputKind(("user_id", "samples"), list, "teacher output", "label.py --teacher")


def check_teacher_line(record, where, known_ids):
    """The content of a teacher output line, as calibrate.read_samples and evaluate.iter_predictions read
    it: user_id one of `known_ids` (the users file's, or those of a shard's batches), samples a list of
    {"text": a string, "finish_reason": "stop" or "length"}. A DataError "file:line: field: expected ..."."""
    uid = record.get("user_id")
    if not isinstance(uid, str) or uid not in known_ids:
        raise DataError(f"{where}: user_id: {uid!r} is not one of the users this output labels; expected a user of "
                        "--users (a shard: of its batches); is --out the output of another users file?")
    for i, sample in enumerate(record["samples"]):
        if not (isinstance(sample, dict) and isinstance(sample.get("text"), str)
                and sample.get("finish_reason") in ("stop", "length")):
            raise DataError(f"{where}: samples[{i}]: expected {{\"text\": a string, \"finish_reason\": \"stop\" or "
                            f"\"length\"}}, got {json.dumps(sample, ensure_ascii=False)[:60]}")


def meta_path(out_path):
    """The sidecar that records what produced a resumable output (settings): <out>.meta.json."""
    return out_path + ".meta.json"


def refuse_input_as_output(out, inputs):
    """A ValueError when `out` names one of the input files {flag: path} (the same path or the same file):
    writing it would destroy what is being read."""
    for flag, path in inputs.items():
        if path and (os.path.abspath(out) == os.path.abspath(path)
                     or os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path)):
            raise ValueError(f"{out}: --out is the input {flag} {path}; expected a new output file")


def check_own_output(path, fields, what, tool, payload=list, check=None):
    """Validate that every whole line of an existing `path` is a JSON object with `fields` whose second
    is a `payload` (this tool's output), touching nothing; one line at a time. Returns ([(lineno, first
    field, byte offset of the line)], byte length of the whole lines, the bytes after them). A file
    whose lines are anything else is an error naming the line: --out pointing at the wrong file is
    refused before a byte of it changes. Lines are read strictly (a repeated key, NaN: DataError naming
    the line), and `check(record, "file:line")`, when given, checks each line's content (check_teacher_line,
    predict.py's check_profiles_line): what the readers downstream would refuse is refused here."""
    ids, keep, tail = [], 0, b""
    if not os.path.exists(path):
        return ids, keep, tail
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                tail = line  # the last line, half-written
                break
            start, keep = keep, keep + len(line)
            if not line.strip():
                continue
            try:
                record = loads_strict(line.decode("utf-8"))
            except DataError as e:  # JSON, but not what our writer writes (a repeated key, NaN)
                raise DataError(f"{path}:{lineno}: {e}") from None
            except (UnicodeDecodeError, ValueError, RecursionError):
                record = None
            if not (isinstance(record, dict) and all(k in record for k in fields) and isinstance(record[fields[1]], payload)):
                raise ValueError(f"{path}:{lineno}: expected a {what} line {{{', '.join(map(repr, fields))}}}; "
                                 f"is --out pointing at the right file? Refusing to touch a file {tool} did not write")
            if check is not None:
                check(record, f"{path}:{lineno}")
            ids.append((lineno, record[fields[0]], start))
    return ids, keep, tail


def resume_output(path, settings=None, force=False, kind=TEACHER_OUTPUT, check=None):
    """Check an existing output of `kind` before resuming it; touches nothing. Returns ({user_id: byte
    offset of its line}, byte length of its whole lines, the half-written last line).

    Refused, each with a one-line error: a whole line that is not {kind.fields} (not our file), or whose
    content `check` refuses (check_own_output); a user written twice; a half-written last line that does not start like one of our lines;
    with `settings`: a non-empty file without <out>.meta.json (not written by this tool, or by a
    version that did not record its settings) or whose recorded settings differ (the error names the
    keys), unless `force`. A killed run leaves at most one partial line (lines are written whole, then
    flushed and fsynced); open_output cuts it once all of this passed."""
    ids, keep, tail = check_own_output(path, kind.fields, kind.what, kind.tool, kind.payload, check)
    written = {}
    for lineno, uid, offset in ids:
        if uid in written:
            raise ValueError(f"{path}:{lineno}: user_id: {uid!r} written twice; expected one line per user")
        written[uid] = offset
    if tail and not LINE_START.startswith(tail[:len(LINE_START)]):
        raise ValueError(f"{path}: the last line is neither whole nor the start of a {kind.what} line; "
                         "is --out pointing at the right file? Refusing to touch it")
    if (keep or tail) and settings is not None and not force:
        recorded = read_meta(path, kind)
        if recorded is None:
            raise ValueError(f"{path}: has no {os.path.basename(meta_path(path))} recording the settings it was "
                             f"written with; expected a {kind.tool} output to resume: choose another --out, "
                             "or pass --force-resume to resume it anyway")
        changed = settings_diff(recorded["settings"], settings)
        if changed:
            raise ValueError(f"{path}: written with other settings ({changed}); resuming would mix two kinds of "
                             "answers: rerun with the recorded settings, choose another --out, or pass --force-resume")
    return written, keep, tail


def read_meta(path, kind=TEACHER_OUTPUT):
    """The recorded <out>.meta.json of an output of `kind`, or None when there is none."""
    meta = meta_path(path)
    if not os.path.exists(meta):
        return None
    try:
        with open(meta, encoding="utf-8") as f:
            recorded = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{meta}: unreadable ({e}); expected the JSON {kind.tool} writes") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("settings"), dict):
        raise ValueError(f"{meta}: settings: expected the JSON object {kind.tool} writes")
    return recorded


def settings_diff(recorded, settings, prefix=""):
    """"key recorded -> now" for every key whose value differs ("" when none does); where both values are
    objects, their keys: "teacher_fingerprint.model.safetensors.sha256 "9f2c..." -> "41ab..."."""
    def short(v):
        text = json.dumps(v, ensure_ascii=False)
        return text if len(text) <= 40 else text[:37] + "..."
    changes = []
    for k in sorted(set(recorded) | set(settings)):
        was, now = recorded.get(k), settings.get(k)
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            changes.append(settings_diff(was, now, f"{prefix}{k}."))
        else:
            changes.append(f"{prefix}{k} {short(was)} -> {short(now)}")
    return ", ".join(changes)


def unfinished_batches(written, batches):
    """The batches (lists of user ids) of which some users but not all are written: what an interrupted
    run was writing. They are sampled again whole: a checkpoint's samples depend on the whole batch,
    so the rest of it drawn as a smaller batch would differ from an uninterrupted run's."""
    return [b for b in batches if 0 < sum(uid in written for uid in b) < len(b)]


def rewrite_without(path, keep, skip):
    """Rewrite `path` (atomically) with its whole lines, the first `keep` bytes, except the lines that
    start at the byte offsets in `skip`."""
    with open(path, "rb") as src, atomic_writer(path) as dst:
        start = 0
        for line in src:
            if start >= keep:
                break
            if start not in skip:
                dst.write(line.decode("utf-8"))
            start += len(line)


def open_output(path, settings=None, force=False, kind=TEACHER_OUTPUT, batches=(), check=None):
    """Validate `path` (resume_output), then make it ready to append to: drop the lines of any batch an
    interrupted run wrote in part (unfinished_batches; `batches`: this process's batches as lists of
    user ids), cut a half-written last line, and record `settings` in <out>.meta.json (a forced resume
    over other settings keeps the earlier ones under "earlier_settings"). `check`: each line's content
    (check_own_output). Returns the user ids written."""
    written, keep, tail = resume_output(path, settings, force, kind, check)
    unfinished = [uid for b in unfinished_batches(written, batches) for uid in b if uid in written]
    drop = sorted(written.pop(uid) for uid in unfinished)
    if drop:
        print(f"{path}: dropping {len(drop)} whole line(s) of a batch an interrupted run wrote in part "
              "(the batch is sampled again whole)", file=sys.stderr)
    if drop and any(offset > drop[0] for offset in written.values()):  # not the last lines: other batches
        rewrite_without(path, keep, set(drop))  # (--force-resume over another batch_users) came after them
    elif tail or drop:
        if tail:
            print(f"{path}: dropping a half-written last line ({len(tail)} bytes) from an interrupted run",
                  file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(drop[0] if drop else keep)
            f.flush()
            os.fsync(f.fileno())
    if settings is not None:
        try:
            recorded = (read_meta(path, kind) if keep else None) or {}
        except ValueError:  # unreadable, and --force-resume said to go on
            recorded = {}
        earlier = list(recorded.get("earlier_settings") or [])
        if recorded.get("settings") not in (None, settings):
            earlier.append(recorded["settings"])
        write_meta(path, settings, earlier, kind)
    return set(written)


def write_meta(path, settings, earlier=(), kind=TEACHER_OUTPUT, **extra):
    """<out>.meta.json: what produced an output of `kind` (read back by read_meta on resume)."""
    meta = {"written_by": kind.tool, "settings": settings, "earlier_settings": list(earlier), **extra}
    atomic_write_text(meta_path(path), json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them: the checkpoint has a tokenizer


def require_tokenizer(path):
    """A FileNotFoundError naming `path` when the checkpoint folder holds none of TOKENIZER_FILES (transformers
    would otherwise build some tokenizer and fail later on without naming the folder)."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer ({', '.join(TOKENIZER_FILES)}) in this directory; expected "
                                "the checkpoint's own tokenizer and chat template beside its weights")


def model_fingerprint(model):
    """The identity of the model behind an output: "sim" for the simulated teacher, else
    common.checkpoint_fingerprint of the checkpoint (sizes and sha256 of its config, weights, tokenizer and
    chat template files), so that a resume after the weights were retrained or replaced under the same
    path is refused. Reads every byte of the checkpoint once (docs/design.md, "Untrusted input")."""
    if model == "sim":
        return "sim"
    fingerprint = checkpoint_fingerprint(model)  # names a missing folder, config.json or *.safetensors
    require_tokenizer(model)
    return fingerprint


def teacher_settings(args, taxonomy, model_key="teacher"):
    """What decides the answers in a teacher output: recorded in <out>.meta.json, compared on resume.
    The checkpoint (or "sim") is args.<model_key>, recorded under that key with its identity under
    <model_key>_fingerprint (model_fingerprint). batch_users too: it cuts the batches, whose users a
    checkpoint samples together and whose order decides which rank of a torchrun run labels which users."""
    model = getattr(args, model_key)
    settings = {
        model_key: "sim" if model == "sim" else os.path.abspath(model),
        f"{model_key}_fingerprint": model_fingerprint(model),
        "samples": args.samples, "seed": args.seed,
        "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
        "template_kwargs": args.template_kwargs, "batch_users": args.batch_users,
        "taxonomy_sha256": hashlib.sha256(json.dumps(taxonomy, sort_keys=True).encode()).hexdigest(),
        "users_sha256": file_sha256(args.users),  # the file's bytes: another users file is another job
    }
    if args.temperature == 0 and model != "sim":  # how a checkpoint's greedy answers write their confidence
        settings["confidence"] = args.confidence
    return json.loads(json.dumps(settings))  # as it reads back from the file (tuples -> lists)


# -----------------------------------------------------------------------------
# Teachers: something that turns chat prompts into n answer texts. Everything after the text
# (parsing, the output line, restarts) is shared by the real checkpoint and the simulated teacher.


def _derived_seed(*parts):
    """A 63-bit seed from any values, stable across runs and machines (unlike Python's hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def checked_tokenizer(path):
    """The checkpoint's tokenizer (common.load_tokenizer); a folder without a tokenizer file or without a chat
    template is a one-line error naming it."""
    require_tokenizer(path)
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: no chat template (chat_template.jinja, or chat_template in tokenizer_config.json); "
                         "expected the checkpoint's own chat template")
    return tokenizer


class CheckpointTeacher:
    """A real checkpoint: chat template -> generate (prefix-shared n samples) -> decoded texts.
    `sampling`: SamplingParams whose stop_ids become the checkpoint's end-of-turn tokens."""

    def __init__(self, path, sampling, template_kwargs, device, dtype):
        self.tokenizer = checked_tokenizer(path)  # first: a missing directory is named before weights load
        self.model = load_model(path, dtype=getattr(torch, dtype), device=device)
        check_tokenizer_fits(self.tokenizer, self.model, path)
        self.sampling = dataclasses.replace(sampling, stop_ids=tuple(stop_ids_for(self.tokenizer)))
        self.template_kwargs = template_kwargs
        self.device = device

    def answer(self, message_lists, n, seeds):
        """[[(text, finish_reason, n_tokens)] * n] per chat. One generate() call for the whole batch,
        seeded from all its users' seeds (samples depend on the batch, as batched sampling does)."""
        prompts = [chat_prompt_ids(self.tokenizer, m, **self.template_kwargs) for m in message_lists]
        generator = torch.Generator(device=self.device).manual_seed(_derived_seed(*seeds))
        out = rollout.generate(self.model, prompts, self.sampling, n=n, generator=generator, tokenizer=self.tokenizer)
        stop_ids = self.sampling.stop_ids
        return [[(completion_text(self.tokenizer, s, stop_ids), s.finish_reason, len(s.tokens)) for s in group]
                for group in out]


class SimulatedTeacher:
    """profilebench.SimTeacher (a simulated teacher, no weights) behind the same interface."""

    def __init__(self, taxonomy, seed, temperature):
        self.sim = profilebench.SimTeacher(taxonomy, seed=seed, temperature=temperature)

    def answer(self, message_lists, n, seeds):
        """Same shape as CheckpointTeacher.answer. SimTeacher seeds each user from its --seed and the
        user's visible data, so answers do not depend on batches or restarts (`seeds` is not needed)."""
        return [[(text, "stop", 0) for text in self.sim.answer(messages, n)] for messages in message_lists]


def teacher_line(user, samples):
    """A teacher output line: {"user_id", "samples": [{"text", "finish_reason"}]}."""
    return {"user_id": user["user_id"], "samples": [{"text": text, "finish_reason": reason} for text, reason, _ in samples]}


def label_users(teacher, users, taxonomy, out_path, n, seed=0, batch_users=32, progress=True, done=None,
                shard=(0, 1), stop_after_batches=0, to_line=teacher_line, desc="teacher"):
    """Stage 1 teacher labelling: render, sample n answers, append one whole line per user,
    to_line(user, [(text, finish_reason, n_tokens)] * n) (predict.py writes profiles through it).

    The users are cut into batches of batch_users, in file order (teacher_batches); with shard = (rank,
    K) this process labels batches rank, rank + K, ... So every run, one process or K, first or
    resumed, samples the same batches. Each user has its own seed (from `seed` and its user_id); a
    checkpoint's samples depend on the seeds of its whole batch, the simulated teacher's on the user only.
    Restartable: batches already in `out_path` are skipped (`done`: the ids open_output returned;
    None: open it here as a teacher output, without recording settings), and one that an interrupted
    run wrote in part is sampled again whole. stop_after_batches > 0: stop after that many batches (to
    test restarts). Returns (users written, tokens generated, whether all of this process's batches are done).
    """
    rank, world = shard
    batches = teacher_batches(users, batch_users)[rank::world]
    if done is None:
        done = open_output(out_path, batches=[[u["user_id"] for u in b] for b in batches])
    todo = [[u for u in b if u["user_id"] not in done] for b in batches]
    todo = [b for b in todo if b]
    if done:
        print(f"{out_path}: {len(done)} users already done, {sum(map(len, todo))} to go", file=sys.stderr)
    bar = Progress(sum(map(len, todo)), desc if world == 1 else f"{desc} {rank}/{world}", "user",
                   disable=not progress)
    written, n_tokens, t0 = 0, 0, time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as f:
        for k, batch in enumerate(todo):
            if stop_after_batches and k == stop_after_batches:
                break
            seeds = [_derived_seed(seed, u["user_id"]) for u in batch]
            answers = teacher.answer([render_prompt(u, taxonomy) for u in batch], n, seeds)
            for user, samples in zip(batch, answers):
                f.write(dumps_line(to_line(user, samples)))
                n_tokens += sum(k for _, _, k in samples)
            f.flush()  # whole lines reach the file once per batch (a kill leaves at most one partial
            os.fsync(f.fileno())  # line, cut off by resume_output); one fsync per batch, not per user
            written += len(batch)
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0):.1f} tok/s")
            bar.update(len(batch))
    bar.close()
    return written, n_tokens, written == sum(map(len, todo))


# -----------------------------------------------------------------------------
# Labelling under torchrun: rank r of K labels batches r, r + K, ... into its own shard
# <out>.rank{r}-of{K} (with its own .meta.json, resumable on its own); once every shard is complete,
# rank 0 merges them into <out> in the one-process order (the same bytes as a one-process run).

SHARD_NAME = re.compile(r"\.rank(\d+)-of(\d+)\Z")
LABELLING_WAIT = datetime.timedelta(hours=24)  # how long a rank that has finished waits for the others


def teacher_batches(users, batch_users):
    """The labelling batches: runs of batch_users consecutive users of the users file, in order."""
    return [users[i:i + batch_users] for i in range(0, len(users), batch_users)]


def shard_path(out_path, rank, world):
    """Rank `rank`'s shard of a K-process labelling run: <out>.rank{r}-of{K}."""
    return f"{out_path}.rank{rank}-of{world}"


def existing_shards(out_path):
    """{K: [shard paths]} of the shards of `out_path` on disk (their .meta.json sidecars aside)."""
    found = {}
    for path in sorted(glob.glob(glob.escape(out_path) + ".rank*-of*")):
        m = SHARD_NAME.search(path[len(out_path):])
        if m:
            found.setdefault(int(m.group(2)), []).append(path)
    return found


def merge_shards(out_path, users, batch_users, world, settings, force=False):
    """Merge the K complete shards of `out_path` into it: batch g is read from shard g mod K, so the
    lines come in the users file's order, exactly as a one-process run writes them; one line at a
    time, written atomically. Each shard must record `settings` (unless `force`) and hold exactly its
    batches' users, in order, each line a valid teacher line (check_teacher_line); the shards are removed
    once <out> is in place, and kept whole when anything is refused."""
    paths = [shard_path(out_path, r, world) for r in range(world)]
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{path}: missing; expected the {world} shards of a torchrun run with "
                             f"--nproc_per_node x --nnodes = {world}")
        recorded = read_meta(path)
        changed = "no .meta.json" if recorded is None else settings_diff(recorded["settings"], settings)
        if changed and not force:
            raise ValueError(f"{path}: written with other settings ({changed}); merge with the settings the shards "
                             "were labelled with, or pass --force-resume")
    known = {u["user_id"] for u in users}
    readers, linenos = [open(path, "rb") for path in paths], [0] * world
    try:
        with atomic_writer(out_path) as out:
            for g, batch in enumerate(teacher_batches(users, batch_users)):
                r = g % world
                for user in batch:
                    line, linenos[r] = _next_line(readers[r], linenos[r])
                    record = _shard_record(line, f"{paths[r]}:{linenos[r]}") if line.endswith(b"\n") else None
                    uid = record["user_id"] if record else None
                    if uid != user["user_id"]:
                        raise ValueError(f"{paths[r]}: expected user {user['user_id']!r} (batch {g}) next, got "
                                         f"{uid!r}: the shard is incomplete, or was written with other batches; run "
                                         "the labelling command again to complete it")
                    check_teacher_line(record, f"{paths[r]}:{linenos[r]}", known)
                    out.write(line.decode("utf-8"))
            for path, f in zip(paths, readers):
                if _next_line(f)[0]:
                    raise ValueError(f"{path}: lines after its last batch; expected only the users of its batches")
    finally:
        for f in readers:
            f.close()
    write_meta(out_path, settings, merged_from=[os.path.basename(p) for p in paths])
    for path in paths:
        os.remove(path)
        if os.path.exists(meta_path(path)):
            os.remove(meta_path(path))
    print(f"merged {world} shards -> {out_path}")


def _next_line(f, lineno=0):
    """(the next non-blank line of a file open in binary mode (b"" at its end), its line number) after
    line `lineno`."""
    line, lineno = f.readline(), lineno + 1
    while line and not line.strip():
        line, lineno = f.readline(), lineno + 1
    return line, lineno


def _shard_record(line, where):
    """A shard's whole line as a teacher output record {"user_id", "samples": [...]}, read strictly; anything
    else is a DataError naming the line."""
    try:
        record = loads_strict(line.decode("utf-8"))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        record = None
    if not (isinstance(record, dict) and "user_id" in record and isinstance(record.get("samples"), list)):
        raise DataError(f"{where}: expected a teacher output line {{'user_id', 'samples'}}; refusing to merge it")
    return record


def start_ranks():
    """(rank, K): (0, 1) in one process; under torchrun a gloo process group (a barrier at the end is all
    labelling needs, on CPU, whatever device the teacher runs on) that waits LABELLING_WAIT for the
    slowest rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    before_process_group()
    dist.init_process_group("gloo", timeout=LABELLING_WAIT)
    return dist.get_rank(), world


def is_complete(out_path, users, settings, force):
    """Whether `out_path` is a finished teacher output of `settings` for all `users` (checked, untouched)."""
    check = functools.partial(check_teacher_line, known_ids={u["user_id"] for u in users})
    written, _, tail = resume_output(out_path, settings, force, check=check)
    return not tail and all(u["user_id"] in written for u in users)


# -----------------------------------------------------------------------------
# CLI


@dataclasses.dataclass
class LabelConfig:
    model: str = opt("", "generic mode: HF checkpoint dir to sample from, with --prompts")
    prompts: str = opt("", 'generic mode: JSONL of {"id", "messages"}')
    teacher: str = opt("", "teacher labelling: an HF checkpoint dir, or sim for the simulated teacher, with --users")
    users: str = opt("", "teacher mode: users JSONL to label")
    taxonomy: str = opt("", "teacher mode: taxonomy JSON (empty: taxonomy.json of the repository)")
    out: str = opt("", "output JSONL", nonempty=True)
    samples: int = opt(1, "samples per prompt / user", min=1)
    max_new_tokens: int = opt(512, "new tokens per sample at most", min=1)
    temperature: float = opt(1.0, "0 = greedy", min=0)
    confidence: str = opt("value", "greedy: a stated confidence is its most probable value 1..10, the value nearest "
                                   "its expectation, or read token by token", choices=rollout.CONFIDENCE_DECODING)
    top_k: int = opt(0, "sample from the k most likely tokens (0 = all)", min=0)
    top_p: float = opt(1.0, "nucleus mass to sample from (1 = all)", gt=0, max=1)
    seed: int = opt(0, "makes the samples reproducible", min=0)
    batch_users: int = opt(64, "teacher mode: users per generate() call", min=1)
    max_batch_tokens: int = opt(0, "KV-cache slots per batch (0 = 64k on cpu, 128k on cuda)", min=0)
    template_kwargs: dict = opt({}, 'passed to the chat template, e.g. {"enable_thinking": false}')
    device: str = opt("auto", "auto = cuda if available, else cpu", **DEVICE)
    dtype: str = opt("auto", "auto = bfloat16 on cuda, float32 on cpu", choices=("auto", "float32", "bfloat16"))
    progress: bool = opt(True, "a progress bar (on a terminal) or progress lines (in a log)")
    force_resume: bool = opt(False, "teacher mode: resume --out even though <out>.meta.json records other settings")
    merge: bool = opt(False, "teacher mode: merge the complete shards <out>.rank{r}-of{K} of a torchrun run into --out "
                             "(rank 0 does this itself when every shard is complete)")
    stop_after_batches: int = opt(0, "teacher mode: stop after this many batches per process (0 = all; to test restarts)",
                                  min=0)

    def __post_init__(self):
        check_fields(self, "label")
        if bool(self.model) == bool(self.teacher):
            raise ConfigError("give exactly one of --model (with --prompts) or --teacher (with --users)")
        if self.model and not self.prompts:
            raise ConfigError("--model needs --prompts")
        if self.teacher and not self.users:
            raise ConfigError("--teacher needs --users")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"

    def sampling(self, stop_ids):
        return rollout.SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p, tuple(stop_ids),
                              self.max_batch_tokens, confidence=self.confidence)


def run_prompts(args):
    """Generic mode: chat prompts -> n samples each -> {"id", "samples": [{"text", "finish_reason"}]} lines."""
    refuse_input_as_output(args.out, {"--prompts": args.prompts, "--model": args.model})
    records = read_prompts(args.prompts)
    check_own_output(args.out, ("id", "samples"), "sampler output", "label.py --model")  # replaced whole: only ours
    tokenizer = checked_tokenizer(args.model)  # first: a missing directory is named before weights load
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    check_tokenizer_fits(tokenizer, model, args.model)
    stop_ids = stop_ids_for(tokenizer)
    prompts = [chat_prompt_ids(tokenizer, r["messages"], **args.template_kwargs) for r in records]
    t0 = time.perf_counter()
    out = rollout.generate(model, prompts, args.sampling(stop_ids), n=args.samples, seed=args.seed, progress=args.progress,
                           tokenizer=tokenizer)
    seconds = time.perf_counter() - t0
    write_jsonl(args.out, [{"id": r["id"], "samples": [{"text": completion_text(tokenizer, s, stop_ids),
                                                        "finish_reason": s.finish_reason} for s in group]}
                           for r, group in zip(records, out)])
    n_tokens = sum(len(s.tokens) for group in out for s in group)
    print(f"{len(records)} prompts x {args.samples} samples -> {args.out}: "
          f"{n_tokens} sampled tokens in {seconds:.1f} s, {n_tokens / seconds:.1f} tokens/s")


def run_teacher(args):
    """Teacher mode: users -> rendered prompts -> n answers each -> one line per user (restartable). Under
    torchrun each rank labels its share of the batches into its own shard and rank 0 merges them."""
    refuse_input_as_output(args.out, {"--users": args.users, "--taxonomy": args.taxonomy,
                                      "--teacher": None if args.teacher == "sim" else args.teacher})
    taxonomy = load_taxonomy(args.taxonomy)
    users = read_users(args.users, taxonomy=taxonomy)
    settings = teacher_settings(args, taxonomy)
    if args.merge:
        with contextlib.ExitStack() as held:  # the output and every shard: no run may be writing them
            held.enter_context(hold_output(args.out))
            shards = existing_shards(args.out)
            if len(shards) != 1 or os.path.exists(args.out):
                raise ValueError(f"{args.out}: --merge needs the shards of one torchrun run ({len(shards)} sets found: "
                                 f"{', '.join(f'K = {k}' for k in shards) or 'none'}) and no {args.out} yet")
            world = next(iter(shards))
            for r in range(world):
                held.enter_context(hold_output(shard_path(args.out, r, world)))
            merge_shards(args.out, users, args.batch_users, world, settings, args.force_resume)
        return
    rank, world = start_ranks()
    try:
        with contextlib.ExitStack() as held:
            hold_outputs(held, args.out, rank, world)
            _label_shard(args, users, taxonomy, settings, existing_shards(args.out), rank, world)
    finally:
        cleanup_distributed()


def hold_outputs(held, out, rank, world):
    """Hold (common.hold_output, into the ExitStack `held`) what this process writes, for the whole run:
    one process: <out>; under torchrun rank 0 holds <out> (it merges into it) and every rank its own shard.
    The ranks agree before any of them starts: a run refused on one rank (another run holds the output)
    stops on all of them, each with one line."""
    refused = None
    try:
        if rank == 0:
            held.enter_context(hold_output(out))
        if world > 1:
            held.enter_context(hold_output(shard_path(out, rank, world)))
    except ValueError as e:
        refused = e
    if world > 1 and not all_ranks(refused is None):
        raise refused or ValueError(f"{out}: another process of this torchrun run could not hold its output (its "
                                    "error names it); expected one run per output")
    if refused:
        raise refused


def _label_shard(args, users, taxonomy, settings, shards, rank, world):
    """run_teacher's work in one process of `world`: checks, this process's batches, and the merge."""
    other = [paths[0] for k, paths in shards.items() if k != world or world == 1]
    if other:
        raise ValueError(f"{other[0]}: a shard of a torchrun run with other --nproc_per_node x --nnodes than this "
                         "one: resume it with as many processes, merge complete shards with --merge, or remove them")
    if world > 1 and os.path.exists(args.out):  # a merged (or one-process) output: nothing left to shard
        if not is_complete(args.out, users, settings, args.force_resume):
            raise ValueError(f"{args.out}: an unfinished one-process output; resume it with one process (no "
                             "torchrun), or choose another --out")
        if rank == 0:
            for path in shards.get(world, []):  # left behind by a merge that stopped before removing them
                os.remove(path)
                if os.path.exists(meta_path(path)):
                    os.remove(meta_path(path))
            print(f"{args.out}: complete, nothing to do")
        return
    out = args.out if world == 1 else shard_path(args.out, rank, world)
    mine = [[u["user_id"] for u in b] for b in teacher_batches(users, args.batch_users)[rank::world]]
    check = functools.partial(check_teacher_line, known_ids={uid for b in mine for uid in b})
    done = open_output(out, settings, args.force_resume, TEACHER_OUTPUT, mine, check)  # before loading weights
    if args.teacher == "sim":
        teacher = SimulatedTeacher(taxonomy, args.seed, args.temperature)
    else:
        if world > 1 and args.device == "cuda":  # one GPU per process of a node
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        teacher = CheckpointTeacher(args.teacher, args.sampling(()), args.template_kwargs, args.device, args.dtype)
    t0 = time.perf_counter()
    written, n_tokens, finished = label_users(teacher, users, taxonomy, out, args.samples, seed=args.seed,
                                              batch_users=args.batch_users, progress=args.progress, done=done,
                                              shard=(rank, world), stop_after_batches=args.stop_after_batches)
    seconds = time.perf_counter() - t0
    rate = f", {n_tokens} tokens, {n_tokens / seconds:.1f} tokens/s" if n_tokens else ""
    print(f"{written} users labelled x {args.samples} samples -> {out} in {seconds:.1f} s "
          f"({written / max(seconds, 1e-9):.1f} users/s{rate})")
    if world > 1 and all_ranks(finished) and rank == 0:
        merge_shards(args.out, users, args.batch_users, world, settings, args.force_resume)
    elif world > 1 and rank == 0:
        print(f"not every shard of {args.out} is complete; run the same command again to resume them")


def main(argv=None):
    args, rest = load_config(LabelConfig, argv, prog="label.py", description=__doc__.strip().split("\n\n")[0])
    if rest:
        raise ConfigError(f"unexpected arguments {rest}; use --key value (see --help)")
    if args.teacher:
        run_teacher(args)
    else:
        run_prompts(args)


if __name__ == "__main__":
    run_cli(main, "label.py")
