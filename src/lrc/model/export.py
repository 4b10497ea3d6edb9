"""Export: multiply the projections out into an ordinary Hugging Face checkpoint of the teacher's family."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lrc.model.weights import export_state_dict

if TYPE_CHECKING:
    from lrc.model.clone import LowRankClone


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


def end_of_turn_id(tokenizer, template: str) -> int | None:
    """The special token a chat template closes an assistant turn with (e.g. <|im_end|>), or None: rendered
    after a probe reply, the first token of what follows it, when that is a special token."""
    probe = "lrc-probe-reply"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 - a template with requirements of its own (a system turn, ...): no guess
        return None
    if probe not in text:
        return None
    after = text[text.rindex(probe) + len(probe):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) else None


def chat_generation_config(generation_config, tokenizer, template: str | None):
    """The generation config of a chat student: generation also stops at the template's end-of-turn token
    (a base teacher's config stops only at its EOS, so a chat reply would run on into the next turn)."""
    if generation_config is None or not template:
        return generation_config
    eot = end_of_turn_id(tokenizer, template)
    eos = generation_config.eos_token_id
    stops = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if eot is not None and eot not in stops:
        generation_config = generation_config.__class__.from_dict(generation_config.to_dict())  # a copy
        generation_config.eos_token_id = stops + [eot]
    return generation_config
