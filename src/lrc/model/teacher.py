"""Loading a teacher (whole, or empty on the meta device with each process reading its own shards) and sharding
it under fsdp: every way a model folder can be unusable ends in one `UserError` line.

A teacher is read in the dtype it is stored in (`--teacher-dtype auto`: its config.json's `dtype`) and, when
that is bf16/fp16, hooked to compute in fp32 whenever autocast is off (`lrc.model.precision`). Damaged files
(config.json, safetensors headers, shard indexes) are named before transformers reads them.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from lrc.distributed.fsdp import local_bytes, world_mesh
from lrc.errors import REDOWNLOAD, UserError, first_line, read_json_object
from lrc.model.families import family_for
from lrc.model.meta import tied_head
from lrc.model.precision import DTYPES, checkpoint_dtype, upcast_frozen_modules

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# What reading a damaged or incomplete weight file raises: safetensors' header checks, torch.load's zip
# reader (RuntimeError) and weights-only unpickler, a short read (EOFError), a missing shard (OSError).
_WEIGHT_ERRORS = (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError)


def _weight_files(folder: Path) -> list[Path]:
    """The weight files `from_pretrained` reads from a local model folder (safetensors first, as it does);
    UserError naming a damaged index or a shard it lists that is missing."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = read_json_object(folder / index, "teacher weight index").get("weight_map") or {}
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise UserError(f"teacher weight file {shard} (listed in {folder / index}) is missing; "
                                    f"{REDOWNLOAD}")
            return shards
    return []


def _check_safetensors(files: list[Path]) -> None:
    """UserError naming the first safetensors file whose header does not parse or does not cover the file
    exactly (truncated, garbage). Reads headers only (memory-mapped), so it is cheap at any size."""
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"teacher weight file {f} is damaged or incomplete ({first_line(e)}); "
                            f"{REDOWNLOAD}") from None


@contextlib.contextmanager
def _transformers_errors_only():
    """Silence transformers' warnings (its multi-line load report) while loading: load_teacher turns what
    the report would show (missing or mismatched tensors) into one UserError line."""
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def load_teacher_config(path_or_id: str, trust_remote_code: bool = False):
    """The teacher's config (config.json only, no weights), checked: a supported family of causal LM."""
    p = Path(path_or_id)
    looks_local = p.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
    if looks_local and not p.exists():
        raise UserError(f"teacher path {path_or_id} does not exist; pass a model directory or a hub id")
    if p.is_dir() and not (p / "config.json").exists():
        raise UserError(f"teacher directory {path_or_id} has no config.json; pass a Hugging Face model directory")
    if p.is_dir():
        read_json_object(p / "config.json", "teacher config")
    try:
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load teacher config from {path_or_id}: {first}") from None
    family_for(config)  # unsupported family -> UserError listing the supported ones
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise UserError(f"teacher {path_or_id} is a {archs[0]}, not a causal language model (*ForCausalLM)")
    return config


def load_teacher(path_or_id: str, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False):
    """Load a causal-LM teacher from a local directory or hub id; UserError on anything unusable.

    dtype: the storage dtype, or "auto" for the checkpoint's own (config.json `dtype`/`torch_dtype`). A teacher
    stored in bf16/fp16 still computes in fp32 whenever autocast is off (`lrc.model.precision`)."""
    config = load_teacher_config(path_or_id, trust_remote_code)
    p = Path(path_or_id)
    if isinstance(dtype, str):
        dtype = checkpoint_dtype(config) if dtype == "auto" else DTYPES[dtype]
    files = _weight_files(p) if p.is_dir() else []
    _check_safetensors(files)
    try:
        with _transformers_errors_only():
            # transformers types the return as one model; with output_loading_info=True it is (model, info)
            model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", AutoModelForCausalLM.from_pretrained(
                path_or_id, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, as one line
            ))
    except _WEIGHT_ERRORS as e:
        where = files[0] if len(files) == 1 else path_or_id
        reason = "not a readable weight file" if isinstance(e, (pickle.UnpicklingError, EOFError)) \
            else first_line(e)
        raise UserError(f"cannot load teacher weights from {where}: {reason}; check that the weight files are "
                        f"complete, or {REDOWNLOAD}") from None
    # transformers fills tensors missing from the checkpoint (or of the wrong shape) with random values and
    # only warns: a teacher like that would be silently random.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        which = (f"missing tensors: {len(missing)}, e.g. {missing[0]}" if missing
                 else f"tensors of the wrong shape: {len(mismatched)}, e.g. {mismatched[0]}")
        raise UserError(f"teacher weights in {path_or_id} do not match its config.json: {which}; "
                        f"{REDOWNLOAD}")
    model.eval()
    upcast_frozen_modules(model)
    return model


# ---------------------------------------------------------------------------------------------- fsdp loading
WEIGHT_FILES_ATTR = "lrc_weight_files"
"""The attribute of an empty teacher (`load_empty_teacher`) naming the file of each parameter."""


def _safetensors_index(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{tensor name: (file, shape)} from the headers of safetensors files (nothing else is read)."""
    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                index[name] = (f, tuple(h.get_slice(name).get_shape()))
    return index


def load_empty_teacher(path_or_id: str, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False):
    """The teacher with its parameters on the meta device (no memory), for `--parallel fsdp`: each process
    then reads only its own shards from the files (`lrc.model.teacher.shard_teacher`), so a node holds about one
    teacher however many processes it runs. None where the weights are not local safetensors files (then the
    whole teacher is loaded as usual, `load_teacher`).

    The file of each parameter is kept in the model's `lrc_weight_files`. Names and shapes are checked against
    the files' headers here, before anything is sharded: where they differ (a checkpoint transformers would
    convert or reject), None, and `load_teacher` loads it or names what is wrong as before."""
    config = load_teacher_config(path_or_id, trust_remote_code)
    p = Path(path_or_id)
    files = _weight_files(p) if p.is_dir() else []
    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    _check_safetensors(files)
    if isinstance(dtype, str):
        dtype = checkpoint_dtype(config) if dtype == "auto" else DTYPES[dtype]
    with torch.device("meta"), _transformers_errors_only():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    index = _safetensors_index(files)
    where: dict[str, Path] = {}
    for name, param in model.named_parameters():  # a tied head is its embedding's parameter, named once
        found = index.get(name)
        if found is None or found[1] != tuple(param.shape):
            return None
        where[name] = found[0]
    setattr(model, WEIGHT_FILES_ATTR, where)
    model.eval()
    upcast_frozen_modules(model)
    return model


def is_empty(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are still to be read (`load_empty_teacher`)."""
    return hasattr(model, WEIGHT_FILES_ATTR)


def read_own_shards(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate an empty teacher's parameters on `device` (each process only its shards, once FSDP2 has sharded
    them) and read exactly those rows from the safetensors files; recompute the buffers (RoPE frequencies)."""

    where: dict[str, Path] = getattr(model, WEIGHT_FILES_ATTR)
    model.to_empty(device=device)
    with contextlib.ExitStack() as stack, torch.no_grad():
        handles: dict[Path, Any] = {}
        for name, param in model.named_parameters():
            f = where[name]
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
            read_local_rows(param, handles[f].get_slice(name))
    _init_buffers(model)
    delattr(model, WEIGHT_FILES_ATTR)


def _init_buffers(model) -> None:
    """The non-persistent buffers `to_empty` left uninitialised: transformers' RoPE modules recompute theirs
    (its own `_init_weights`, as `from_pretrained` does for a model built on the meta device)."""
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            model._init_weights(module)
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and not bool(torch.isfinite(buf).all()):
            raise RuntimeError(f"buffer {name} of the teacher was not initialised after loading its shards")


def read_local_rows(param: torch.Tensor, source) -> None:
    """Copy this rank's rows of a whole tensor into `param` (a DTensor sharded on dim 0 by FSDP2, or a plain
    tensor: all of it). `source` is sliceable like safetensors' `get_slice` (only the rows asked for are
    read from the file) and may be stored in another dtype."""
    sharded = hasattr(param, "to_local")  # a DTensor (not imported: torch builds without distributed lack it)
    local = cast(Any, param).to_local() if sharded else param
    rows = local.shape[0] if local.dim() else 0
    start = 0
    if sharded and dist.is_available() and dist.is_initialized():
        # FSDP2 shards dim 0 as torch.chunk does: ceil(n / world) rows per rank, the last ranks fewer or none
        per_rank = -(-param.shape[0] // dist.get_world_size())
        start = min(dist.get_rank() * per_rank, param.shape[0])
    if local.dim() == 0:
        local.copy_(source[...])
        return
    if rows:
        local.copy_(source[start:start + rows].to(local.dtype))


def shard_teacher(teacher: nn.Module, device: torch.device,
                  compute_dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """Shard `teacher` (a supported *ForCausalLM, frozen) over all ranks of the default process group.

    The teacher may be loaded on the CPU: FSDP2 moves only each rank's shard to `device`. Or it may be empty
    (`load_empty_teacher`: built on the meta device): then each rank reads only its own shards
    from the safetensors files, so no process ever holds the whole teacher. Each gathered layer
    computes in `compute_dtype` (FSDP2's mixed-precision policy casts it after the all-gather), so a bf16
    teacher under fp32 precision needs no other cast in its forward.
    Returns (bytes of teacher parameters this rank holds, bytes of the whole teacher)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch.distributed: loaded only under fsdp

    fam = family_for(teacher.config)
    base = teacher.get_submodule(fam.base)
    head_layer, embed_module = teacher.get_submodule(fam.head), base.get_submodule(fam.embed)
    tied = tied_head(teacher)
    mesh = world_mesh(device)
    stored = next(teacher.parameters()).dtype
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != stored else None)
    # reshard_after_forward=True also for the root: its default keeps the root's tensors (the embedding)
    # gathered after forward, expecting a backward that never comes for a frozen teacher.
    for layer in cast(nn.ModuleList, base.get_submodule(fam.layers)):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    # The embedding its own unit, gathered in the dtype it is stored in and its rows cast after the lookup: the
    # root's cast would gather the vocabulary-wide table in the compute dtype (twice the bytes of a bf16 one)
    rows_mp = MixedPrecisionPolicy(output_dtype=mp.param_dtype) if mp.param_dtype is not None else mp
    fully_shard(embed_module, mesh=mesh, reshard_after_forward=True, mp_policy=rows_mp)
    fully_shard(base, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    if tied:  # point the head at the embedding's shards (the old whole tensor is then freed)
        head_layer.weight = embed_module.weight
    else:  # read only through `gathered`; never run as a module during training
        fully_shard(head_layer, mesh=mesh, reshard_after_forward=True)
    if is_empty(teacher):  # built on the meta device: each rank reads its own shards from the files now
        read_own_shards(teacher, device)
    return local_bytes(teacher.parameters()), sum(p.numel() * p.element_size() for p in teacher.parameters())
