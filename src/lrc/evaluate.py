"""Held-out next-token loss and perplexity of a model directory, a run directory or a teacher."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lrc.data import PackedDataset, build_packed_dataset, collate, resolve_data_files
from lrc.errors import UserError
from lrc.families import family_for
from lrc.losses import IGNORE_INDEX, kd_lm_loss
from lrc.precision import autocast
from lrc.sharding import gathered


@torch.no_grad()
def model_loss(model, data: PackedDataset, batch_size: int = 4, device="cpu", max_batches: int | None = None,
               precision: str = "fp32") -> dict:
    """Mean next-token CE (nats per labelled token) of a HF causal LM over packed sequences."""
    fam = family_for(model.config)
    base, head = model.get_submodule(fam.base), gathered(model.get_submodule(fam.head).weight)
    ce_sum, n_lab = 0.0, 0
    n = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    device = torch.device(device)
    cast = autocast(precision, device)
    for start in range(0, n, batch_size):
        batch = collate([data.get(i) for i in range(start, min(n, start + batch_size))])
        b = {k: v.to(device) for k, v in batch.items()}
        with cast:
            h = base(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).last_hidden_state
            labels = b["labels"].reshape(-1)
            _, ce, _ = kd_lm_loss(h.reshape(-1, h.shape[-1]), head, None, None, labels,
                                  torch.ones_like(labels, dtype=torch.bool), kl_weight=0.0)
        k = int((labels != IGNORE_INDEX).sum())
        ce_sum += float(ce) * k
        n_lab += k
    loss = ce_sum / max(1, n_lab)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n_lab}


def load_for_eval(path: str, device="cpu"):
    """(model, tokenizer, default seq_len) for an exported/HF model directory or an lrc run directory."""
    p = Path(path)
    if (p / "config.yaml").is_file():
        from lrc.export import build_student_model
        from lrc.trainer import load_run

        cfg, method, tokenizer, _ = load_run(p, device)
        if cfg.method == "lrc":
            model = build_student_model(method).to(device)
        else:
            model = method.model
        return model.eval(), tokenizer, cfg.seq_len
    from lrc.students import load_teacher, load_tokenizer

    model = load_teacher(path).to(device)
    tokenizer = load_tokenizer(path, whose="the model's",
                               if_missing="export with `lrc export` (it copies the teacher's)")
    return model, tokenizer, None


def evaluate_path(path: str, data: list[str], seq_len: int | None = None, batch_size: int = 4,
                  device="cpu", text_field: str = "text", cache_dir: Path | None = None) -> dict:
    files = resolve_data_files(data)
    model, tokenizer, run_seq_len = load_for_eval(path, device)
    seq_len = seq_len or run_seq_len or 512
    ds = build_packed_dataset(files, tokenizer, seq_len, cache_dir=cache_dir,
                              text_field=text_field)
    result = model_loss(model, ds, batch_size=batch_size, device=device, precision="auto")
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def lm_eval_tasks(path: str, tasks: list[str], device="cpu") -> dict:
    """lm-evaluation-harness tasks on an exported model, when lm-eval is installed."""
    try:
        import lm_eval
    except ImportError:
        raise UserError("--tasks needs lm-eval: pip install 'lowrankclone[eval]'") from None
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path}", tasks=tasks, device=str(device))
    return {t: r for t, r in out["results"].items()}
