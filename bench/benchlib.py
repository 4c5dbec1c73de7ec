"""What the benchmarks share: the peak-memory reading of a worker process and the demo's SFT chats.
Each bench script imports it from its own folder (a script's folder is first on sys.path), in this
environment and in a peer's virtual environment alike."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_memory_mb(device):
    """Peak memory of this process in MB: torch.cuda.max_memory_allocated on CUDA, max RSS on CPU."""
    import resource

    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_chats(path, n_users, seed=0):
    """The demo's SFT chats at `path` (JSONL): profilebench users rendered with confprofile.render_prompt, each
    answered once by the simulated teacher."""
    sys.path.insert(0, ROOT)
    from common import write_jsonl
    from confprofile import load_taxonomy, render_prompt
    from profilebench import SimTeacher, make_world
    taxonomy = load_taxonomy()
    users, _, _ = make_world(n_users, 1, seed=seed, taxonomy=taxonomy)
    teacher = SimTeacher(taxonomy, seed=seed)
    chats = []
    for u in users:
        prompt = render_prompt(u, taxonomy)
        chats.append({"user_id": u["user_id"],
                      "messages": prompt + [{"role": "assistant", "content": teacher.answer(prompt, 1)[0]}]})
    write_jsonl(path, chats)
