"""
The SFT set as training data (sft.py's): the records read and checked, the held-out split, the epoch
order (a pure function of (seed, epoch), so the step number is the data position and a resumed run sees
the same batches), each process's length-sorted micro-batches of a global batch, and their padding.
The loss mask of each chat is sft.py's (encode_chats).
"""
import json
import random
from dataclasses import dataclass, field

import torch

from common import iter_jsonl

# -----------------------------------------------------------------------------
# Records


def read_chats(path):
    """SFT records of a JSONL file; each needs messages ending with an assistant answer."""
    records = []
    for _, where, r in iter_jsonl(path, expected="one SFT record per line"):
        msgs = r.get("messages") if isinstance(r, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: messages: expected a list of {{'role', 'content'}} objects")
        for k, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: messages[{k}]: expected {{\"role\": string, \"content\": string}}, "
                                 f"got {json.dumps(m, ensure_ascii=False)[:80]}")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: messages: expected the last message to be the assistant answer, "
                             f"got role {msgs[-1]['role']!r}")
        records.append(r)
    if not records:
        raise ValueError(f"{path}: no SFT records")
    return records


def split_eval(records, fraction, seed):
    """Hold out round(fraction * n) records (at least one when fraction > 0), chosen by seed."""
    n_eval = max(1, round(fraction * len(records))) if fraction > 0 else 0
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


# -----------------------------------------------------------------------------
# Batches: the epoch order, each process's micro-batches, padding


def epoch_batches(lengths, batch_size, seed, epoch, length_group):
    """Global batches of one epoch, a pure function of (seed, epoch): shuffle, then sort by length
    within windows of `length_group` batches (similar lengths share a batch: less padding), then
    shuffle the batches. The last incomplete batch is dropped."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[:len(order) // batch_size * batch_size]
    window = batch_size * max(1, length_group)
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def local_micro_batches(batch, lengths, n_micro, rank, world_size):
    """This process's micro-batches of a global batch: sort by length, cut into world*accum pieces,
    piece k goes to process k % world_size."""
    batch = sorted(batch, key=lambda i: lengths[i])
    size = len(batch) // n_micro
    pieces = [batch[k * size:(k + 1) * size] for k in range(n_micro)]
    return pieces[rank::world_size]


def pad_batch(sequences, masks, pad_id, device):
    """Right-pad to the longest: (input_ids [B, T], loss_mask [B, T]); pads never carry loss."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    lm = torch.zeros((len(sequences), T), dtype=torch.bool)
    for b, (s, m) in enumerate(zip(sequences, masks)):
        ids[b, :len(s)] = torch.tensor(s)
        lm[b, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), lm.to(device)


@dataclass
class SFTData:
    """The encoded chats of a run and its schedule: examples [(input_ids, loss_mask)], their lengths and
    predicted answer tokens, the held-out examples."""
    examples: list
    eval_examples: list
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    lengths: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    epoch: dict = field(default_factory=dict)  # {epoch: its batches}, the current epoch only

    def batch(self, step, cfg):
        """The global batch of 0-based `step`: the data order is a pure function of (seed, epoch)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self.epoch:
            self.epoch = {epoch: epoch_batches(self.lengths, cfg.batch_size, cfg.seed, epoch, cfg.length_group)}
        return self.epoch[epoch][k]
