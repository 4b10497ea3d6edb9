"""Peak memory of one LRC training step as the vocabulary grows: chunked fused CE + KL vs full logits.

A small model (hidden 128 -> 64, 2 layers) with 2,048-token sequences, at vocabularies of 32,000 and
128,256, so that the vocabulary-wide losses dominate. Each measurement runs in its own process (peak RSS
on CPU, peak allocated memory on CUDA).

    python benchmarks/loss_memory.py
"""

from __future__ import annotations

from lrc.train.bench import SHAPES, measure_in_subprocess


def main() -> None:
    rows = []
    for shape in ("vocab32k", "vocab128k"):
        for variant in ("lrc", "lrc_naive"):
            r = measure_in_subprocess(shape, 1, variant, 1)
            rows.append(r)
            print(f"vocab {SHAPES[shape]['vocab']:>7,}  {'chunked' if variant == 'lrc' else 'full logits':12s} "
                  f"peak {r['peak_bytes'] / 2**20:8,.0f} MiB  step {r['seconds']:.2f} s  "
                  f"[{r['device']}, {r['precision']}]", flush=True)
    by = {(r["shape"], r["variant"]): r["peak_bytes"] / 2**20 for r in rows}
    for variant, label in (("lrc", "chunked"), ("lrc_naive", "full logits")):
        growth = by[("vocab128k", variant)] - by[("vocab32k", variant)]
        print(f"growth 32,000 -> 128,256 with {label}: {growth:,.0f} MiB")


if __name__ == "__main__":
    main()
