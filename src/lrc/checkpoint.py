"""Checkpoints: only what is trained, plus optimizer, schedule, data position; written atomically.

Layout: RUN_DIR/checkpoints/step-00000100/{trainable.safetensors, optimizer.pt, state.json}. A checkpoint is
written under a temporary name and renamed into place, so a crash mid-write never leaves a half checkpoint
that looks complete. `optimizer.pt` is read back with `torch.load(weights_only=True)`: no pickled code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lrc.errors import UserError

PREFIX = "step-"


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
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
    # Tied tensors would be stored twice by name; safetensors refuses shared storage, so clone.
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, device: torch.device) -> tuple[dict, dict, dict]:
    """(trainable tensors, optimizer/scheduler state, state.json); UserError if anything is unreadable."""
    try:
        trainable = load_file(str(path / "trainable.safetensors"), device=str(device))
        opt_state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except (OSError, SafetensorError, RuntimeError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"checkpoint {path} is corrupt ({reason}); delete that folder to resume from the one before it"
        ) from None
    return trainable, opt_state, state
