"""A checkpoint save that fails (disk full) leaves the previous checkpoint intact and stops with one line."""

from __future__ import annotations

import errno

import pytest
import torch

from lrc.errors import UserError
from lrc.train import checkpoint as ckpt


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    weights = {"w": torch.ones(3)}
    first = ckpt.save_checkpoint(tmp_path, 1, weights, {"optimizer": {}}, {"step": 1}, keep=3)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(UserError) as info:
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, {"optimizer": {}}, {"step": 2}, keep=3)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "step-00000001" in message
    assert ckpt.checkpoint_dirs(tmp_path) == [first]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [first.name]  # no temporary left
