"""Held-out loss of a method during training (student CE and KL), and of any model (`model_loss`).

One loop serves both (`heldout_loss`): a plain Hugging Face model is evaluated as a `Direct` method without a
teacher. Under torchrun each rank takes every world_size-th sequence and the sums are all-reduced; with a
sharded teacher every rank runs as many forwards as rank 0 (`eval_batches(lockstep=True)`), because a sharded
forward is a collective operation.
"""

from __future__ import annotations

import math

import torch

from lrc.data import PackedDataset, collate
from lrc.data.batch import IGNORE_INDEX, to_device
from lrc.distributed.processes import DistInfo, all_reduce_sum
from lrc.methods.direct import Direct
from lrc.model.precision import autocast


def eval_batches(n: int, batch_size: int, max_batches: int | None, info: DistInfo, lockstep: bool = False):
    """(sequence indices, counted) of this rank's held-out batches: every world_size-th sequence from its
    rank, at most max_batches batches (None: all). lockstep: pad with uncounted repeats up to rank 0's count."""
    limit = None if max_batches is None else max_batches * batch_size

    def share(rank):
        return list(range(rank, n, info.world_size))[:limit]

    indices = share(info.rank)
    batches = [(indices[s:s + batch_size], True) for s in range(0, len(indices), batch_size)]
    if lockstep:
        most = math.ceil(len(share(0)) / batch_size)
        batches += [(share(0)[:batch_size], False)] * (most - len(batches))
    return batches


@torch.no_grad()
def heldout_loss(method, val: PackedDataset | None, *, batch_size: int, device, precision: str = "auto",
                 info: DistInfo | None = None, max_batches: int | None = None, lockstep: bool = False) -> dict:
    """Held-out CE (nats per labelled token) and KL of a method's student, in eval mode, averaged over ranks.

    Returns {"loss", "perplexity", "kl", "tokens" (input tokens), "labels" (labelled tokens)}; {} without data."""
    if val is None or len(val) == 0:
        return {}
    info = info or DistInfo()
    device = torch.device(device)
    was_training = method.training
    method.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # CE sum, KL sum, labelled tokens, input tokens
    for chosen, counted in eval_batches(len(val), batch_size, max_batches, info, lockstep):
        batch = to_device(collate([val.get(i) for i in chosen]), device)
        with autocast(precision, device):
            out = method(**batch)
        if counted:
            labels = float((batch["labels"] != IGNORE_INDEX).sum())
            n = batch["input_ids"].numel()
            sums += torch.tensor([float(out.terms["ce"]) * labels, float(out.terms["kl"]) * n, labels, n],
                                 dtype=torch.float64)
    tot = all_reduce_sum(sums.to(device), info).cpu()
    method.train(was_training)
    ce = float(tot[0] / tot[2].clamp_min(1))
    return {"loss": ce, "perplexity": math.exp(min(ce, 50.0)), "kl": float(tot[1] / tot[3].clamp_min(1)),
            "tokens": int(tot[3]), "labels": int(tot[2])}


def model_loss(model, data: PackedDataset, batch_size: int = 4, device="cpu", max_batches: int | None = None,
               precision: str = "fp32", info: DistInfo | None = None, lockstep: bool = False) -> dict:
    """Mean next-token CE of a Hugging Face causal LM over packed sequences: {"loss", "perplexity", "tokens"
    (labelled tokens)}."""
    r = heldout_loss(Direct(model), data, batch_size=batch_size, device=device, precision=precision, info=info,
                     max_batches=max_batches, lockstep=lockstep)
    return {"loss": r["loss"], "perplexity": r["perplexity"], "tokens": r["labels"]}
