"""Which dtype each computation runs in, whatever dtype the frozen teacher is stored in.

Published teachers are stored in bf16 (sometimes fp16); the trainable projections, norms, their gradients
and AdamW state are always fp32. Two precisions (`--precision`):

* bf16: `torch.autocast`. Matrix products run in bf16, whatever the operands are stored in; nothing here
  casts (autocast does, per op).
* fp32: no autocast, and every product runs in fp32. A teacher stored in bf16/fp16 is *stored* so (its
  memory is what the user chose) but *computes* in fp32: `upcast_frozen_modules` casts each teacher module's
  own weights to fp32 for the duration of that module's forward only (one matrix at a time), and
  `for_product` casts a teacher tensor to the dtype of the fp32 tensor it is multiplied with. On a CPU without
  bf16 matrix units this is also the fast path: there bf16 products are hundreds of times slower than fp32.

The rule is decided per call from the autocast state, so the same model serves training, held-out
evaluation, `lrc eval` and export without being told a precision.
"""

from __future__ import annotations

import functools
from typing import cast

import torch
from torch import nn

# The storage dtypes a teacher may be loaded in (`--teacher-dtype`); "auto" is the checkpoint's own.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions; elsewhere bf16 matmuls are emulated and ~100x slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """"bf16" or "fp32" for `--precision` auto/bf16/fp32 on `device` (auto: bf16 where it is fast). A CUDA
    device this machine does not have (`lrc plan` for another machine) is taken to have bf16 (Ampere on)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32


def autocast(precision: str, device: torch.device):
    """The context a forward runs in: bf16 autocast, or nothing (fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision, device) == "bf16")


def autocasting(t: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(t.device.type)


def for_product(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` ready to be multiplied with `like`: unchanged under autocast (it casts per op) or when the dtypes
    agree; else cast to `like`'s dtype (a bf16 teacher matrix meeting an fp32 projection or activation)."""
    if t.dtype == like.dtype or autocasting(t):
        return t
    return t.to(like.dtype)


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config.json says its weights are stored in (float32 when it does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), None)
    return cast(torch.dtype, dtype) if dtype in DTYPES.values() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _low_precision_params(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters(recurse=False)
            if p.is_floating_point() and p.dtype != torch.float32]


def upcast_frozen_modules(model: nn.Module) -> int:
    """Make a frozen model stored in bf16/fp16 compute in fp32 whenever autocast is off.

    Each module that holds low-precision weights of its own swaps in fp32 copies of them for the duration of
    its forward and back again after it (also when the forward raises), so at most one module's weights
    exist in fp32 at a time. An embedding instead casts the rows it returns (a whole fp32 copy of a
    128K-row table would be wasted on a few hundred rows). Under autocast nothing is swapped. Returns the
    number of modules hooked. For frozen models only: the swapped-in copies carry no gradient.
    """
    hooked = 0
    for module in model.modules():
        names = _low_precision_params(module)
        if not names:
            continue
        if isinstance(module, nn.Embedding):
            module.register_forward_hook(_embedding_rows_to_fp32)
        else:  # the names are fixed at load: the hooks do no search per call
            module.register_forward_pre_hook(functools.partial(_swap_in_fp32, names=tuple(names)))
            module.register_forward_hook(_swap_back, always_call=True)
        hooked += 1
    return hooked


def _embedding_rows_to_fp32(module, args, output):
    if autocasting(output) or output.dtype == torch.float32:
        return None
    return output.float()


def _swap_in_fp32(module, args, names: tuple[str, ...]):
    params = [module._parameters[name] for name in names]
    # under autocast, or when something else (FSDP2's mixed-precision policy) already gathered them in fp32
    if autocasting(params[0]) or all(p.dtype == torch.float32 for p in params):
        return
    module.__dict__["_lrc_low_precision"] = {name: p.data for name, p in zip(names, params)}
    for p in params:
        p.data = p.data.float()


def _swap_back(module, args, output):
    for name, data in module.__dict__.pop("_lrc_low_precision", {}).items():
        module._parameters[name].data = data
