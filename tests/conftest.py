"""Tiny random teachers of every supported family, built offline from transformers config classes."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILY_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}
VOCAB = 101


def tiny_config(family: str, tied: bool, **overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )
    if family == "llama":
        # llama3 RoPE scaling must be honoured, not worked around
        kwargs["rope_parameters"] = {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }
    if family == "mistral":
        kwargs["sliding_window"] = 8
    kwargs.update(overrides)
    return FAMILY_CONFIGS[family](**kwargs)


def make_teacher(family: str = "llama", tied: bool = False, seed: int = 0, **overrides):
    """A random fp32 teacher with non-unit RMSNorm gains and non-zero biases (so folding is really tested)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: a gradient error measured against the gradient's own size (P_down's
    gradients are ~1e-5 and the norm gains' ~1e-4 on the tiny teachers, so an absolute tolerance would
    pass an error as large as the gradient itself)."""
    return float((got - want).double().norm() / want.double().norm().clamp_min(1e-30))


def assert_gradients_close(got: dict, want: dict, rtol: float) -> None:
    """Same names, and every gradient within `rtol` of the reference relative to its own norm."""
    assert got.keys() == want.keys() and want
    errors = {n: relative_error(got[n], want[n]) for n in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, (worst, errors[worst])


def packed_batch(batch: int = 2, seq: int = 24, seed: int = 1):
    """input_ids and position_ids of two packed documents per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    cut = seq // 3
    pos = torch.cat([torch.arange(cut), torch.arange(seq - cut)]).expand(batch, seq).clone()
    return ids, pos


@pytest.fixture(scope="module")
def one_thread():
    """Two OpenMP threads on a shared 2-core machine make tiny matmuls ~50x slower. Subprocesses get
    OMP_NUM_THREADS=1 too, so in-process and subprocess runs also do the same arithmetic."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One LRC_CACHE folder per test module: its runs share tokenised data."""
    return tmp_path_factory.mktemp("lrc-cache")


@pytest.fixture
def lrc_cache(cache_dir, monkeypatch):
    """LRC_CACHE pointed at the module's cache folder (use with pytest.mark.usefixtures)."""
    monkeypatch.setenv("LRC_CACHE", str(cache_dir))
    return cache_dir


@pytest.fixture(params=[("llama", False), ("mistral", True), ("qwen2", True), ("qwen3", False)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def teacher(request):
    family, tied = request.param
    return make_teacher(family, tied)


@pytest.fixture(autouse=True, scope="session")
def _datasets_cache(tmp_path_factory):
    """Data is read through `datasets`, which keeps Arrow copies in its cache: keep the tests' out of the home
    folder (subprocesses inherit the variable)."""
    import datasets

    path = tmp_path_factory.mktemp("hf-datasets")
    old_env, old = os.environ.get("HF_DATASETS_CACHE"), datasets.config.HF_DATASETS_CACHE
    os.environ["HF_DATASETS_CACHE"], datasets.config.HF_DATASETS_CACHE = str(path), path
    yield
    datasets.config.HF_DATASETS_CACHE = old
    if old_env is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old_env
