"""
Processes and sharding: the process group that torchrun starts (RANK / WORLD_SIZE / LOCAL_RANK), the
collectives the scripts use (all_ranks, all_reduce_sum, barrier), and sharded data parallel (FSDP2:
shard_model, full_parameters, full_state_dict). Imports nothing of the project; trainer.py, checkpoint.py,
label.py and the trainers use it (like gpt-fast keeps tensor parallelism in a file of its own).
"""
import contextlib
import gc
import importlib
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

# -----------------------------------------------------------------------------
# Processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK) and devices


def before_process_group():
    """Import torch._dynamo before a process group exists (see cleanup_distributed). Only processes that
    create a group pay for it (~1.6 s on these CPUs): every other script starts that much faster."""
    importlib.import_module("torch._dynamo")


def setup_distributed():
    """Init the process group when launched by torchrun. Returns (rank, world_size, local_rank, device)."""
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before_process_group()
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
    good. So before_process_group imports torch._dynamo before any group exists (the defaults are then
    None), and gc.collect() frees what waits in reference cycles (a DistributedDataParallel wrapper)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_ranks(flag, device="cpu"):
    """True when `flag` is true on every rank (every rank must call it: a barrier too); `device`: where
    the backend's tensors live (cuda for NCCL)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


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


# -----------------------------------------------------------------------------
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


def local_shard(t):
    """This rank's part of a sharded (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t
