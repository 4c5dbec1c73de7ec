"""
The training state of sft.py and rl.py: what a killed run resumes from, and what produced it.

Reads top to bottom: the plain state (one file set, written by rank 0: safetensors + JSON, never a
pickle); the sharded state (FSDP2: one file set per rank); the run record (the resolved config and
its input files' sha256) and the resume guards built on it; the metrics log. Nothing here knows SFT
or GRPO: trainer.py calls it.
"""
import dataclasses
import glob
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.tensor import DTensor

from common import ConfigError, atomic_write_text, checkpoint_fingerprint, file_sha256, fsync_dir, fsync_file
from distributed import is_distributed, is_sharded, local_shard, reshard, unwrap

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
    files = {"model": {k: local_shard(v).detach() for k, v in params.items()},
             "optimizer": {k: local_shard(v) for k, v in optimizer_tensors.items()}, "rng": rng_tensors}
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


SHARD_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "json")  # rank<r>.<each>


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
    missing = [f"rank{r}.{kind}" for r in range(world) for kind in SHARD_FILES if not os.path.isfile(
        os.path.join(path, f"rank{r}.{kind}"))]
    if missing:  # every rank sees the same folder, so every rank stops here: none waits in a collective
        raise ValueError(f"{path}: {', '.join(missing[:4])} missing; expected every rank's files of the sharded "
                         f"state ({', '.join(SHARD_FILES)} for ranks 0..{world - 1})")
    reshard(model)
    params = dict(unwrap(model).named_parameters())
    shards = load_file(os.path.join(path, f"rank{rank}.model.safetensors"))
    if set(shards) != set(params):
        raise ValueError(f"{path}/rank{rank}.model.safetensors: tensors {sorted(set(shards) ^ set(params))[:5]} do not "
                         "match the model's")
    with torch.no_grad():
        for name, p in params.items():
            local = local_shard(p)
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
        if isinstance(p, DTensor) and t.shape == local_shard(p).shape and t.dim() > 0:
            tensors[name] = DTensor.from_local(t.to(local_shard(p).device), p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(_join_optimizer_state(meta["optimizer"], tensors))
    _set_rng_state(meta["rng"], load_file(os.path.join(path, f"rank{rank}.rng.safetensors")))
    return state["step"], state["extra"]


# What produced a run. A training state records the resolved config and its input files' size and
# sha256; --resume with other settings or changed data is refused, naming what differs, and a fresh
# run refuses an output_dir that holds another run's resumable state (it would be overwritten, or
# mixed into this run's metrics).


def run_record(cfg, path_keys, inputs, checkpoints=None):
    """{"config": the resolved config (path keys made absolute, so one file named two ways is one file),
    "inputs": {name: {"path", "bytes", "sha256"}} of each existing input file in `inputs` {name: path},
    "checkpoints": {name: common.checkpoint_fingerprint(dir)} of each checkpoint dir in `checkpoints`
    (the weights a run starts from: a folder retrained in place is another checkpoint under one path)}."""
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for key in path_keys:
        if config.get(key):
            config[key] = os.path.abspath(config[key])
    files = {name: os.path.abspath(path) for name, path in inputs.items() if path and os.path.isfile(path)}
    return {"config": config, "inputs": {name: {"path": path, "bytes": os.path.getsize(path), "sha256": file_sha256(path)}
                                         for name, path in files.items()},
            "checkpoints": {name: {"path": os.path.abspath(path), "files": checkpoint_fingerprint(path)}
                            for name, path in (checkpoints or {}).items()}}


def record_changes(saved, record, may_change, defaults=None):
    """What differs between a saved run record and this run's, as "key old -> new" strings. A key the
    saved record lacks (an option added after the run started) is no change while this run keeps its
    default {key: value} in `defaults`: the run was made with the behaviour that default stands for."""
    if not isinstance(saved.get("config"), dict):
        return ["the state records no settings to compare (written without a run record)"]
    old, new, absent = saved["config"], record["config"], "(absent)"
    old = {**{k: v for k, v in (defaults or {}).items() if k in new and k not in old}, **old}
    diffs = [f"{key} {old.get(key, absent)!r} -> {new.get(key, absent)!r}" for key in sorted(set(old) | set(new))
             if key not in may_change and old.get(key, absent) != new.get(key, absent)]
    old_inputs = saved.get("inputs") or {}
    for name, now in sorted(record["inputs"].items()):
        was = old_inputs.get(name)
        if was is None or (was.get("bytes"), was.get("sha256")) != (now["bytes"], now["sha256"]):
            before = "no file" if was is None else f"{was.get('bytes')} bytes, sha256 {str(was.get('sha256'))[:12]}"
            diffs.append(f"{name} file {now['path']} changed ({before} -> {now['bytes']} bytes, sha256 {now['sha256'][:12]})")
    old_checkpoints = saved.get("checkpoints") or {}
    for name, now in sorted(record.get("checkpoints", {}).items()):
        was = (old_checkpoints.get(name) or {}).get("files")
        if was != now["files"]:
            changed = "no fingerprint recorded" if not isinstance(was, dict) else ", ".join(
                f for f in sorted(set(was) | set(now["files"])) if was.get(f) != now["files"].get(f))
            diffs.append(f"{name} checkpoint {now['path']} is not the one the run started from ({changed})")
    return diffs


def config_defaults(cfg):
    """{key: default} of a config dataclass, as its run record writes values (JSON types)."""
    fields = dataclasses.fields(cfg)
    return json.loads(json.dumps({f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                                  for f in fields if (f.default, f.default_factory) != (dataclasses.MISSING,) * 2}))


def check_output_dir(cfg, record, may_change, rank=0):
    """Before a run: with --resume, the state in output_dir/train_state must have been made with the same
    settings and input files (except `may_change`; --force-resume goes on with the new ones, saying
    which); without --resume, output_dir must not hold another run's resumable state. A sharded state
    (record["layout"]: parallel fsdp) needs the same parallel mode and world size, even with --force-resume."""
    state_dir = os.path.join(cfg.output_dir, "train_state")
    if os.path.abspath(cfg.output_dir) == os.path.abspath(cfg.model):
        raise ConfigError(f"output_dir {cfg.output_dir}: is the model this run starts from; expected another folder "
                          "(the final checkpoint would overwrite the weights the run is reading)")
    if not cfg.resume:
        if os.path.exists(state_dir) or os.path.exists(state_dir + ".old"):
            raise ConfigError(f"{state_dir}: holds the resumable state of an unfinished run; add --resume to continue "
                              "it, or delete it (or choose another output_dir) to start afresh")
        if finished_run_files(cfg.output_dir) and not cfg.overwrite:
            raise ConfigError(f"{cfg.output_dir}: holds a finished run (its checkpoint, config and metrics); add "
                              "--overwrite to replace it, or choose another output_dir")
        return
    path, saved = read_training_state(state_dir)
    old_layout, layout = saved.get("layout") or {"parallel": "ddp"}, record.get("layout")
    if layout and "fsdp" in (old_layout.get("parallel"), layout["parallel"]) and old_layout != layout:
        diffs = [f"{k} {old_layout.get(k)!r} -> {layout[k]!r}" for k in layout if old_layout.get(k) != layout[k]]
        raise ConfigError(f"{path}: a sharded (parallel=fsdp) training state resumes only with the parallel mode and "
                          f"the number of processes that wrote it: {'; '.join(diffs)}")
    diffs = record_changes(saved, record, may_change, config_defaults(cfg))
    if diffs and not cfg.force_resume:
        raise ConfigError(f"{path}: made with other settings than this --resume: {'; '.join(diffs)}. Resume with the "
                          "recorded settings, add --force-resume to go on with the new ones, or start afresh in another "
                          "output_dir")
    if diffs and rank == 0:
        print(f"--force-resume: {path} goes on with changed settings: {'; '.join(diffs)}", flush=True)


FINISHED_RUN = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "chat_template.jinja", "adapter", "metrics.jsonl", "sft_config.json",
                "rl_config.json", "training_curves.png")  # what a finished sft.py / rl.py run leaves in output_dir


def finished_run_files(output_dir):
    """The files of a finished run in output_dir (its final checkpoint, adapters, metrics, config, curves),
    or [] when there is no final checkpoint (config.json and a *.safetensors beside it)."""
    if not os.path.isfile(os.path.join(output_dir, "config.json")) or not glob.glob(
            os.path.join(glob.escape(output_dir), "*.safetensors")):
        return []
    return sorted(p for pattern in FINISHED_RUN for p in glob.glob(os.path.join(glob.escape(output_dir), pattern)))


def clear_finished_run(output_dir):
    """--overwrite: remove a finished run's files before a new run starts in its folder, so the folder never
    describes one run while holding another's weights (or adapters). Other files are left alone."""
    for path in finished_run_files(output_dir):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def open_metrics(path, start_step):
    """metrics.jsonl for appending: a fresh run starts it empty; a resumed one keeps the lines of the
    steps it resumes after (a killed run may have logged steps past its last checkpoint)."""
    kept = []
    if start_step and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        for number, line in enumerate(lines, 1):
            try:
                step = json.loads(line)["step"] if line.strip() else None
            except (ValueError, KeyError, TypeError):
                if number == len(lines) and not line.endswith("\n"):  # a write cut short (a full disk, a kill)
                    print(f"{path}: line {number} was cut short; dropped (the resumed run logs that step again)",
                          flush=True)
                    break
                raise ValueError(f"{path}: line {number}: expected one JSON object with a \"step\" per line (what "
                                 "the trainers log); repair or delete the file to resume") from None
            if isinstance(step, int) and step <= start_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))
    return open(path, "a", encoding="utf-8")
