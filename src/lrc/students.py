"""Students other than the LRC clone, for baselines, and the shared loading of teachers.

`DirectStudent` trains an ordinary Hugging Face model weight by weight with the same chunked CE + KL as
LRC. It serves three methods: `scratch` (random init, CE only; also the demo's teacher trainer), `kd`
(random init, CE + KL to the teacher) and `prune-kd` (Minitron-style width pruning: keep the teacher's
d_S most energetic residual channels, then CE + KL). Every method exposes the same small surface as
`LowRankClone` (forward -> CloneOutput, trainable_state_dict, export), so the trainer does not care which.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lrc.clone import CloneOutput, LossWeights, LowRankClone, next_token_labels, student_config
from lrc.errors import UserError
from lrc.export import build_student_model
from lrc.families import family_for
from lrc.init import residual_second_moment
from lrc.losses import kd_lm_loss
from lrc.precision import TEACHER_DTYPES, checkpoint_dtype, upcast_frozen_modules

METHODS = ("lrc", "kd", "scratch", "prune-kd")

# What reading a damaged or incomplete weight file raises: safetensors' header checks, torch.load's zip
# reader (RuntimeError) and weights-only unpickler, a short read (EOFError), a missing shard (OSError).
_WEIGHT_ERRORS = (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError)
_REDOWNLOAD = "download or save the model again"
# Tokenizer files that are JSON (checked before loading, so a damaged one is named) and the files one of
# which a tokenizer of the supported families needs.
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (library messages can run to paragraphs)."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__


def _read_json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`; UserError naming the file when it is not valid JSON or not an object."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{what} {path} is damaged (not valid JSON: {_first_line(e)}); restore it: "
                        f"{_REDOWNLOAD}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} is damaged (not a JSON object); restore it: {_REDOWNLOAD}")
    return value


def _weight_files(folder: Path) -> list[Path]:
    """The weight files `from_pretrained` reads from a local model folder (safetensors first, as it does);
    UserError naming a damaged index or a shard it lists that is missing."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = _read_json_object(folder / index, "teacher weight index").get("weight_map") or {}
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise UserError(f"teacher weight file {shard} (listed in {folder / index}) is missing; "
                                    f"{_REDOWNLOAD}")
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
            raise UserError(f"teacher weight file {f} is damaged or incomplete ({_first_line(e)}); "
                            f"{_REDOWNLOAD}") from None


@contextlib.contextmanager
def _transformers_errors_only():
    """Silence transformers' warnings (its multi-line load report) while loading: load_teacher turns what
    the report would show (missing or mismatched tensors) into one UserError line."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False, whose: str = "the teacher's",
                   if_missing: str = "copy the teacher's tokenizer files into it"):
    """The tokenizer of a model directory or hub id; UserError naming the file when one is damaged, or the
    folder when it has none."""
    from transformers import AutoTokenizer

    p = Path(path_or_id)
    if p.is_dir():
        for name in _TOKENIZER_JSON:
            if (p / name).is_file():
                _read_json_object(p / name, f"{whose} tokenizer file")
    try:
        return AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except Exception as e:  # the tokenizers library raises plain Exceptions; any failure here is the files'
        if p.is_dir() and not any((p / name).is_file() for name in _TOKENIZER_FILES):
            raise UserError(f"{path_or_id} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); "
                            f"{if_missing}") from None
        raise UserError(f"cannot load {whose} tokenizer from {path_or_id}: {_first_line(e)}; its tokenizer files "
                        f"are damaged or incomplete: {_REDOWNLOAD}") from None


def load_teacher(path_or_id: str, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False):
    """Load a causal-LM teacher from a local directory or hub id; UserError on anything unusable.

    dtype: the storage dtype, or "auto" for the checkpoint's own (config.json `dtype`/`torch_dtype`). A teacher
    stored in bf16/fp16 still computes in fp32 whenever autocast is off (`lrc.precision`)."""
    p = Path(path_or_id)
    looks_local = p.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
    if looks_local and not p.exists():
        raise UserError(f"teacher path {path_or_id} does not exist; pass a model directory or a hub id")
    if p.is_dir() and not (p / "config.json").exists():
        raise UserError(f"teacher directory {path_or_id} has no config.json; pass a Hugging Face model directory")
    if p.is_dir():
        _read_json_object(p / "config.json", "teacher config")
    try:
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load teacher config from {path_or_id}: {first}") from None
    family_for(config)  # unsupported family -> UserError listing the supported ones
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise UserError(f"teacher {path_or_id} is a {archs[0]}, not a causal language model (*ForCausalLM)")
    if isinstance(dtype, str):
        dtype = checkpoint_dtype(config) if dtype == "auto" else TEACHER_DTYPES[dtype]
    files = _weight_files(p) if p.is_dir() else []
    _check_safetensors(files)
    try:
        with _transformers_errors_only():
            model, info = AutoModelForCausalLM.from_pretrained(
                path_or_id, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, as one line
            )
    except _WEIGHT_ERRORS as e:
        where = files[0] if len(files) == 1 else path_or_id
        reason = "not a readable weight file" if isinstance(e, (pickle.UnpicklingError, EOFError)) \
            else _first_line(e)
        raise UserError(f"cannot load teacher weights from {where}: {reason}; check that the weight files are "
                        f"complete, or {_REDOWNLOAD}") from None
    # transformers fills tensors missing from the checkpoint (or of the wrong shape) with random values and
    # only warns: a teacher like that would be silently random.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        which = (f"missing tensors: {len(missing)}, e.g. {missing[0]}" if missing
                 else f"tensors of the wrong shape: {len(mismatched)}, e.g. {mismatched[0]}")
        raise UserError(f"teacher weights in {path_or_id} do not match its config.json: {which}; "
                        f"{_REDOWNLOAD}")
    model.eval()
    upcast_frozen_modules(model)
    return model


class DirectStudent(nn.Module):
    """An ordinary HF causal LM trained with CE (+ KL to an optional frozen teacher)."""

    def __init__(self, model, teacher=None, loss_weights: LossWeights | None = None, chunk_size: int = 0):
        super().__init__()
        self.model = model
        self.family = family_for(model.config)
        self.loss_weights = loss_weights or LossWeights(kl=0.0, clone=0.0)
        if teacher is None:
            self.loss_weights.kl = 0.0
        else:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
        self.teacher = teacher
        self.chunk_size = chunk_size
        self.config = model.config

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None,
                ce_denominator=None, scale: float = 1.0) -> CloneOutput:
        w = self.loss_weights
        if labels is None:
            labels = next_token_labels(input_ids, position_ids, attention_mask)
        kw = dict(position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        h = self.model.get_submodule(self.family.base)(input_ids=input_ids, **kw).last_hidden_state
        t_hidden = t_head = None
        if w.kl != 0.0:
            t_fam = family_for(self.teacher.config)
            with torch.no_grad():
                t_hidden = self.teacher.get_submodule(t_fam.base)(input_ids=input_ids, **kw).last_hidden_state
            t_hidden = t_hidden.reshape(-1, t_hidden.shape[-1])
            t_head = self.teacher.get_submodule(t_fam.head).weight
        valid = attention_mask.bool().reshape(-1) if attention_mask is not None else torch.ones(
            labels.numel(), dtype=torch.bool, device=labels.device)
        loss, ce, kl = kd_lm_loss(
            h.reshape(-1, h.shape[-1]), self.model.get_submodule(self.family.head).weight, t_hidden, t_head,
            labels.reshape(-1), valid, ce_weight=w.ce, kl_weight=w.kl, temperature=w.kl_temperature,
            chunk_size=self.chunk_size, ce_denominator=ce_denominator, kl_scale=scale,
        )
        return CloneOutput(loss=loss, terms={"ce": ce, "kl": kl})

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:  # frozen: dropout stays off, also while the student trains
            self.teacher.eval()
        return self

    def trainable_state_dict(self):
        return {k: v for k, v in self.model.state_dict().items()}

    def load_trainable_state_dict(self, state):
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not self.config.tie_word_embeddings]
        if missing or unexpected:
            raise UserError(f"checkpoint does not match this student (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")

    def export(self, out_dir, dtype=torch.float32, tokenizer=None, generation_config=None):
        model = self.model.to(dtype)
        if generation_config is not None:
            model.generation_config = generation_config
        model.save_pretrained(out_dir, safe_serialization=True)
        self.model.float()
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)


def random_student(teacher, hidden_size: int, seed: int):
    torch.manual_seed(seed)
    # From the config alone: building a LowRankClone here would allocate every projection for nothing.
    return AutoModelForCausalLM.from_config(student_config(teacher, hidden_size), dtype=torch.float32)


@torch.no_grad()
def pruned_student(teacher, hidden_size: int, calibration_batches) -> tuple[nn.Module, list[int]]:
    """Width-prune the teacher: keep the d_S residual channels with the most activation energy.

    Implemented as an LRC clone whose projections are fixed column selections of the identity, so the
    pruned model comes out of the same weight generation and export as LRC itself."""
    clone = LowRankClone(teacher, hidden_size)
    energy = residual_second_moment(clone, calibration_batches).diagonal()
    keep = torch.argsort(energy, descending=True)[:hidden_size].sort().values
    select = torch.zeros(clone.d_t, hidden_size)
    select[keep, torch.arange(hidden_size)] = 1.0
    for _, p in clone.named_projections():
        p.copy_(select)
    fam = clone.family
    for i, layer in enumerate(clone.layers):
        t_layer = clone.t_layer(i)
        layer.input_norm.copy_(t_layer.get_submodule(fam.input_norm).weight[keep])
        layer.post_attention_norm.copy_(t_layer.get_submodule(fam.post_attention_norm).weight[keep])
    clone.final_norm.copy_(clone.t_base.get_submodule(fam.final_norm).weight[keep])
    return build_student_model(clone).train(), keep.tolist()
