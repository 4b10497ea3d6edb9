"""The `Method` interface every way of training a student implements (`lrc` and the baselines `kd`, `scratch`,
`prune-kd`), and what they share: calibration batches, the export dtype, the layers a student keeps.

A `Method` is a module whose forward is the loss of one micro-batch (`LossOutput`). The trainer, `lrc bench`,
export and evaluation see only this surface:

* `forward(input_ids, labels, position_ids, attention_mask, loss_mask, *, step_tokens, step)`: the loss, with
  the token counts of the whole optimizer step for exact accumulation (`lrc.model.losses.TokenCounts`);
* `begin_step(micro_batches)` / `finish_step(step)`: work shared by a step's micro-batches (LRC generates the
  student once per optimizer step and sends the accumulated gradients back through the generation once);
* `prepare(tokens_per_micro_batch, reuse, sharded)`: choices that depend on the batch (LRC's generated or
  factored matrices), returning a note for the start-up line;
* `shard_trainables(device)`: under `--parallel fsdp`, shard what is trained over the processes (LRC: its
  layer projections, with FSDP2), returning a note for the start-up line;
* `trainable_state_dict` / `load_trainable_state_dict`: what a checkpoint holds;
* `student_model(dtype)`: the student as an ordinary Hugging Face model (export, evaluation).

`METHODS` maps each `--method` name to how it is built and what it needs (calibration batches, whether it can
run on a sharded teacher; `registry`), so no code outside the registry asks which method it has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from lrc.config import RunConfig
from lrc.data.batch import Batch
from lrc.errors import UserError
from lrc.model.losses import LossWeights
from lrc.model.precision import resolve_precision
from lrc.student.select import choose_layers
from lrc.student.shape import kept_layers, needs_layer_choice

Batches = Callable[[], Iterable[Batch]]


@dataclass
class Calibration:
    """Calibration batches, drawn with the run's seed from across the training data (every mixture source in
    its share) and never from the held-out split: `fit` for what is measured or fitted (pca, FFN channels,
    layers, pruning, refit), `check` (disjoint from `fit`) for judging a fit on tokens it did not see."""

    fit: Batches
    check: Batches | None = None


def as_calibration(calibration: Calibration | Batches | None) -> Calibration | None:
    """A bare callable (tests, benchmarks) is fit batches with no check."""
    return calibration if calibration is None or isinstance(calibration, Calibration) else Calibration(calibration)


def export_dtype(cfg: RunConfig, teacher) -> torch.dtype:
    """The lowest precision the student will compute in: its export dtype (by default the teacher's storage
    dtype) or bf16 where training autocasts to it."""
    stored = next(teacher.parameters()).dtype
    device = next(teacher.parameters()).device
    if stored == torch.float32 and resolve_precision(cfg.compute.precision, device) == "bf16":
        return torch.bfloat16
    return stored


class Method(nn.Module):
    """One way to train a student (see the module docstring); subclasses implement `forward`."""

    loss_weights: LossWeights

    def begin_step(self, micro_batches: int) -> Any:
        return None

    def finish_step(self, step: Any) -> None:
        pass

    def prepare(self, tokens_per_micro_batch: int, reuse: int, sharded: bool) -> str:
        return ""

    def shard_trainables(self, device: torch.device) -> str:
        return ""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def student_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        raise NotImplementedError


def kept_layers_of(cfg: RunConfig, teacher, calibration: Calibration | None) -> tuple[int, ...] | None:
    """The teacher layers the student keeps (None: all). `--layers K` alone measures them on the calibration
    batches and records them in cfg.student.drop_layers: the run's config.yaml is written after the method is built,
    so export and --resume rebuild this very student without calibration."""
    n = teacher.config.num_hidden_layers
    if needs_layer_choice(cfg):
        if calibration is None:
            raise UserError("--layers needs calibration data to choose the layers; give --drop-layers instead")
        kept = choose_layers(teacher, calibration.fit(), cast(int, cfg.student.layers))
        cfg.student.drop_layers = ",".join(str(i) for i in range(n) if i not in kept)
    return kept_layers(cfg, n)
