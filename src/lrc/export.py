"""Export: multiply the projections out into an ordinary Hugging Face checkpoint of the teacher's family."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lrc.weights import export_state_dict

if TYPE_CHECKING:
    from lrc.clone import LowRankClone


def build_student_model(clone: LowRankClone, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A plain `*ForCausalLM` holding the generated student weights (strict load: no missing/unexpected keys)."""
    config = clone.student_config()
    config.dtype = dtype
    state = {k: v.to(dtype=dtype, device="cpu") for k, v in export_state_dict(clone).items()}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if clone.tied:
        state.pop(f"{clone.family.head}.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (clone.tied and k == f"{clone.family.head}.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    if clone.tied:
        model.tie_weights()
    return model.eval()


def save_student(model: PreTrainedModel, out_dir: str | Path, tokenizer=None, generation_config=None) -> Path:
    """Write a student as safetensors + config (+ the teacher's tokenizer and generation config)."""
    out_dir = Path(out_dir)
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def export_student(clone: LowRankClone, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                   tokenizer=None, generation_config=None) -> Path:
    """Write an LRC student (`build_student_model`) to `out_dir`."""
    return save_student(build_student_model(clone, dtype), out_dir, tokenizer, generation_config)
