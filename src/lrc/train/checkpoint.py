"""Checkpoints: only what is trained, plus optimizer, schedule, data position; written atomically.

Layout: RUN_DIR/checkpoints/step-00000100/{trainable.safetensors, optimizer.pt, state.json}. A checkpoint is
written under a temporary name, flushed to disk and renamed into place (`lrc.atomic`), and old ones are
renamed away before they are deleted, so a process killed at any moment never leaves a half checkpoint that
looks complete; the next save removes what a killed one left. `optimizer.pt` is read back with
`torch.load(weights_only=True)`: no pickled code.

A run whose trainables are sharded over processes (LRC's projections under `--parallel fsdp`) writes
RUN_DIR/checkpoints/step-00000100/{sharded/, scheduler.pt, state.json} instead: `sharded/` is a
`torch.distributed.checkpoint` folder of the trainables and the AdamW state, each process writing its own
shards (nothing is gathered whole on any process). It resumes on the same number of processes under
`--parallel fsdp` (`restore_sharded`; other counts are refused, see `check_resumable`), and `load_checkpoint`
reads its trainables whole in one process (export, evaluation).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from lrc.atomic import RETIRED, clear_leftovers, fsync_file, fsync_tree, publish_dir, remove_dir
from lrc.errors import UserError

PREFIX = "step-"
SHARDED = "sharded"  # the torch.distributed.checkpoint folder of a sharded checkpoint
SHARDED_OVER = "sharded_over"  # state.json: the number of processes a sharded checkpoint was written by
TMP = ".tmp-"  # a checkpoint being written


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, step: int, trainable: dict, optimizer_state: dict, state: dict,
                    keep: int) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    clear_leftovers(root, (TMP, RETIRED))  # of a save or a deletion that was killed
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP}{PREFIX}{step:08d}"
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
    try:
        # Tied tensors would be stored twice by name; safetensors refuses shared storage, so clone.
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        fsync_tree(tmp)
    except OSError as e:  # disk full, quota: the previous checkpoint stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_failed(run_dir, final, e) from None
    publish_dir(tmp, final)
    _retire_old(run_dir, keep)
    return final


def save_failed(run_dir: Path, final: Path, e: BaseException) -> UserError:
    before = latest_checkpoint(run_dir)
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else \
        type(e).__name__
    return UserError(f"saving checkpoint {final.name} failed ({reason}); the previous checkpoint "
                     f"{before or '(none)'} is intact; free space and continue with --resume")


def _first_failure(e: BaseException) -> BaseException:
    """The error behind a collective CheckpointException (the first failing process's)."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def _retire_old(run_dir: Path, keep: int) -> None:
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        remove_dir(old)


def _corrupt(path: Path, e: BaseException) -> UserError:
    e = _first_failure(e)  # one per rank: the first rank's says what is wrong
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"checkpoint {path} is corrupt ({reason}); delete that folder to resume from the one before it")


def read_state(path: Path) -> dict:
    """A checkpoint's state.json (step, tokens, data position, ...); UserError if it is unreadable."""
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise _corrupt(path, e) from None


def load_checkpoint(path: Path, device: torch.device) -> tuple[dict, dict, dict]:
    """(trainable tensors, optimizer/scheduler state, state.json); UserError if anything is unreadable.

    A sharded checkpoint gives its trainables whole and no optimizer state (`restore_sharded` resumes it)."""
    try:
        state = json.loads((path / "state.json").read_text())
        if (path / SHARDED).is_dir():
            return _read_sharded_trainables(path / SHARDED, device), {}, state
        trainable = load_file(str(path / "trainable.safetensors"), device=str(device))
        opt_state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    except (OSError, SafetensorError, RuntimeError, ValueError, EOFError, CheckpointException) as e:
        raise _corrupt(path, e) from None
    return trainable, opt_state, state


# ------------------------------------------------------------------------------------------- sharded


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / SHARDED).is_dir()


def _read_sharded_trainables(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The trainables of a sharded checkpoint, whole, read in this one process (no process group needed)."""
    import torch.distributed.checkpoint as dcp  # only under torchrun (fsdp, checkpoints)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # only under torchrun (fsdp, checkpoints)

    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    prefix = "trainable."
    wanted = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype, device=device)
              for k, m in meta.state_dict_metadata.items()
              if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not wanted:
        raise ValueError("no trainable tensors in it")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"trainable": wanted}, checkpoint_id=str(folder), no_dist=True)
    return wanted


def _sharded_content(method: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a sharded checkpoint holds, as tensors of this process (shards where sharded): written from and
    read back into in place. The optimizer state is keyed by parameter names (torch's own helpers)."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,  # deferred: only under torchrun (fsdp, checkpoints)
    )

    return {"trainable": method.trainable_state_dict(),  # type: ignore[operator]
            "optimizer": get_optimizer_state_dict(method, optimizer)}


def save_sharded_checkpoint(run_dir: Path, step: int, method: nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler_state: dict, state: dict, keep: int, rank: int, world_size: int) -> Path:
    """Every process writes its shards (collective); rank 0 the rest, then renames the folder into place."""
    import torch.distributed as dist  # only under torchrun (fsdp, checkpoints)
    import torch.distributed.checkpoint as dcp  # only under torchrun (fsdp, checkpoints)

    root = run_dir / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP}{PREFIX}{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        clear_leftovers(root, (TMP, RETIRED))
        tmp.mkdir()
    dist.barrier()
    try:  # collective: a failure in any process (disk full) is raised in all of them
        dcp.save(_sharded_content(method, optimizer), checkpoint_id=str(tmp / SHARDED))  # each fsyncs its files
    except (OSError, CheckpointException) as e:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise save_failed(run_dir, final, _first_failure(e)) from None
    if rank == 0:
        torch.save(scheduler_state, tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, SHARDED_OVER: world_size}, indent=1))
        for written in ("scheduler.pt", "state.json"):  # the shards were flushed by the processes writing them
            fsync_file(tmp / written)
        publish_dir(tmp, final)
        _retire_old(run_dir, keep)
    dist.barrier()  # no process leaves (or exits on a signal) while rank 0 still writes
    return final


def check_resumable(path: Path, world_size: int, sharded: bool) -> None:
    """UserError unless this run (sharded or not, over world_size processes) can resume checkpoint `path`."""
    try:
        saved = json.loads((path / "state.json").read_text()).get(SHARDED_OVER)
    except (OSError, ValueError) as e:
        raise _corrupt(path, e) from None
    if saved is None and sharded:
        raise UserError(f"checkpoint {path} was written without sharded trainables; resume it without "
                        "--parallel fsdp (as --parallel ddp), as it was written")
    if saved is not None and (not sharded or saved != world_size):
        raise UserError(f"checkpoint {path} holds trainables sharded over {saved} processes; resume it with "
                        f"--parallel fsdp on {saved} processes (torchrun --nproc-per-node {saved}), "
                        f"not {world_size}{'' if sharded else ' without fsdp'}")


def restore_sharded(path: Path, method: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
                    ) -> tuple[dict, dict]:
    """Read a sharded checkpoint into `method`'s trainables and `optimizer` in place (collective).
    Returns (scheduler state, state.json)."""
    import torch.distributed.checkpoint as dcp  # only under torchrun (fsdp, checkpoints)
    from torch.distributed.checkpoint.state_dict import (
        set_optimizer_state_dict,  # deferred: only under torchrun (fsdp, checkpoints)
    )

    try:
        content = _sharded_content(method, optimizer)
        dcp.load(content, checkpoint_id=str(path / SHARDED))
        scheduler_state = torch.load(path / "scheduler.pt", map_location=device, weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except (OSError, RuntimeError, ValueError, EOFError, CheckpointException) as e:
        raise _corrupt(path, e) from None
    method.load_trainable_state_dict(content["trainable"])  # type: ignore[operator]
    set_optimizer_state_dict(method, optimizer, content["optimizer"])
    return scheduler_state, state
