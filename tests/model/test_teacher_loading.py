"""`--parallel fsdp` loading: each process builds the teacher on the meta device and reads only its own
shards from the safetensors files. Under torchrun with 3 processes (uneven shards), the gathered teacher
equals the one loaded whole: every parameter, the RoPE buffers, the hidden states. Checkpoints whose names
or formats differ fall back to the whole load."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import env, save_teacher

pytestmark = pytest.mark.usefixtures("one_thread", "lrc_cache")

CHECK = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from lrc.model.teacher import load_empty_teacher, load_teacher, is_empty
    from lrc.distributed.fsdp import gathered
    from lrc.model.teacher import shard_teacher
    dist.init_process_group("gloo")
    path, dtype = sys.argv[1], sys.argv[2]
    whole = load_teacher(path, dtype=dtype)
    empty = load_empty_teacher(path, dtype=dtype)
    assert is_empty(empty) and all(p.is_meta for p in empty.parameters())
    held, total = shard_teacher(empty, torch.device("cpu"), torch.float32)
    assert not is_empty(empty)
    params = dict(whole.named_parameters())
    for name, p in empty.named_parameters():
        assert torch.equal(gathered(p), params[name]), name
    buffers = dict(whole.named_buffers())
    for name, b in empty.named_buffers():
        assert torch.equal(b, buffers[name]), name
    ids = torch.arange(20).remainder(whole.config.vocab_size)[None]
    with torch.no_grad():
        # the base model (the head is read through `gathered` in training, never run as a sharded module)
        got, want = empty.base_model(ids).last_hidden_state, whole.base_model(ids).last_hidden_state
        assert torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-4)
    # one write (print writes the newline apart): the 3 processes share the pipe
    sys.stdout.write(f"rank {dist.get_rank()} ok {held} of {total}\\n")
    sys.stdout.flush()
    dist.barrier()  # every rank done before any tears its gloo pairs down (lrc.distributed.processes.cleanup)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {"llama": save_teacher(root / "llama", "llama", tied=False),
            "qwen3-tied": save_teacher(root / "qwen3", "qwen3", tied=True)}


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype", [("llama", "bfloat16"), ("qwen3-tied", "float32")])
def test_each_process_reads_its_own_shards(family, dtype, teachers, tmp_path, cache_dir):
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", str(script),
           str(teachers[family]), dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(cache_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(line.split(" ok")[0] for line in proc.stdout.splitlines() if " ok " in line) == \
        ["rank 0", "rank 1", "rank 2"]


def test_other_checkpoints_fall_back_to_the_whole_load(teachers, tmp_path):
    from safetensors.torch import load_file, save_file

    from lrc.errors import UserError
    from lrc.model.teacher import load_empty_teacher, load_teacher

    src = teachers["llama"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    tensors.pop(next(k for k in tensors if "layers.0.mlp.up_proj" in k))
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert load_empty_teacher(str(broken)) is None  # names differ: the whole load reports it, as before
    with pytest.raises(UserError, match="missing tensors: 1, e.g. model.layers.0.mlp.up_proj.weight"):
        load_teacher(str(broken))
    (broken / "model.safetensors").unlink()
    torch_bin = tmp_path / "bin"
    import shutil

    shutil.copytree(src, torch_bin)
    (torch_bin / "model.safetensors").unlink()
    import torch

    torch.save(tensors, torch_bin / "pytorch_model.bin")
    assert load_empty_teacher(str(torch_bin)) is None  # not safetensors: loaded whole, as before
