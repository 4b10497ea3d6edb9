"""Evidence for the refit's constants (`lrc.student.refit.RIDGE_PER_DIM`, `FIT_TOKENS_PER_DIM`): held-out KL to
the teacher at step 0 as the calibration tokens per teacher dimension and the ridge vary, with the student's
weights in fp32 and rounded to bf16 (what a bf16 export computes with), on the width series of `lr_sweep.py`
(d_T 256, 512, 1024; trained teachers, nothing downloaded). No training: each cell is pca on the fit batches, the refit
(unguarded, so its own value shows), and the KL on 64 held-out sequences of held-out plays.

    python benchmarks/refit_ridge.py [--teachers plays-w256 plays-w512 plays-w1024] [--markdown BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _markdown import write_block
from lr_sweep import SEQ, TEACHER_WIDTH, WORK, teachers

from lrc.data import build_packed_dataset, collate
from lrc.data.tokenizer import load_tokenizer
from lrc.model.clone import LowRankClone
from lrc.model.teacher import load_teacher
from lrc.student.init import init_pca
from lrc.student.refit import calibration_loss, refit_projections

START, END = "<!-- refit_ridge:start -->", "<!-- refit_ridge:end -->"
TOKENS_PER_DIM = (4, 8, 16, 32, 64)
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2)
BATCH = 8


def _batches(data, indices):
    return [collate([data.get(i) for i in indices[s:s + BATCH]]) for s in range(0, len(indices), BATCH)]


def measure(name: str, paths, width: int) -> dict:
    teacher_dir, train, val = paths
    tok = load_tokenizer(str(teacher_dir))
    teacher = load_teacher(str(teacher_dir), "float32").eval()
    data = build_packed_dataset([str(p) for p in train], tok, SEQ, cache_dir=WORK / "tokens")
    held = build_packed_dataset([str(p) for p in val], tok, SEQ, cache_dir=WORK / "tokens")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    check = _batches(held, list(range(0, len(held), max(1, len(held) // 64)))[:64])
    out: dict = {}
    d_t = TEACHER_WIDTH[name]
    for per_dim in TOKENS_PER_DIM:
        n = max(BATCH, -(-per_dim * d_t // SEQ))
        fit = _batches(data, order[:n])
        clone = LowRankClone(teacher, width)
        init_pca(clone, fit)
        pca = {k: v.clone() for k, v in clone.trainable_state_dict().items()}
        row = {"pca": {dt: calibration_loss(clone, check, dtype=getattr(torch, dt)) for dt in ("float32", "bfloat16")}}
        for ridge in RIDGES:
            clone.load_trainable_state_dict(pca)
            refit_projections(clone, fit, guard=False, ridge=ridge)
            big = max(float(p.abs().max()) for n_, p in clone.trainable_state_dict().items() if n_.startswith("layers"))
            row[f"{ridge:g}"] = {dt: calibration_loss(clone, check, dtype=getattr(torch, dt))
                                 for dt in ("float32", "bfloat16")} | {"max_entry": big}
        out[str(per_dim)] = row
        print(f"[refit_ridge] {name}:{width} {per_dim} tokens/dim: {json.dumps(row)}", flush=True)
    return out


def report(results: dict, md: Path) -> None:
    lines = [START, "", "Held-out KL to the teacher at step 0 (fp32 / weights rounded to bf16); pca, then the refit "
             "at each ridge (of the Gram matrix's mean eigenvalue); in brackets the largest projection entry.", ""]
    for cell, rows in results.items():
        lines += [f"**{cell}**", "", "| tokens per dim | pca | " + " | ".join(f"refit, ridge {r:g}" for r in RIDGES)
                  + " |", "|---|---|" + "---|" * len(RIDGES)]
        for per_dim, row in rows.items():
            cells = [f"{row[f'{r:g}']['float32']:.4f} / {row[f'{r:g}']['bfloat16']:.4f} "
                     f"({row[f'{r:g}']['max_entry']:.1f})" for r in RIDGES]
            lines.append(f"| {per_dim} | {row['pca']['float32']:.4f} / {row['pca']['bfloat16']:.4f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines.append(END)
    print(write_block(md, START, END, lines, "The refit's ridge and calibration size (issue 21)"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=["plays-w256", "plays-w512", "plays-w1024"])
    p.add_argument("--markdown", default="BENCHMARKS.md")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    path = WORK / "refit_ridge.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.report_only:
        paths = teachers(args.teachers)
        t0 = time.time()
        for name in args.teachers:
            for width in (TEACHER_WIDTH[name] // 2, TEACHER_WIDTH[name] // 4):
                key = f"{name}:{width}"
                if key not in results:
                    results[key] = measure(name, paths[name], width)
                    path.write_text(json.dumps(results, indent=1))
        print(f"[refit_ridge] {time.time() - t0:.0f} s")
    report(results, Path(args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
