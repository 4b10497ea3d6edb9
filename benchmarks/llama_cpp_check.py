"""Does llama.cpp serve an exported LRC student as transformers does? Convert, run, compare token for token.

An exported student keeps the teacher's head count and head size, so its `head_dim` is explicit and
num_heads x head_dim differs from its hidden size (the demo's student: hidden 96, 4 heads of 48). This script
1. converts an exported student to GGUF with llama.cpp's own converter, `convert_hf_to_gguf.py`, from the
   llama.cpp sources that the llama-cpp-python sdist vendors (PyPI has only an sdist for Linux; the `gguf`
   wheel has the GGUF writer but not the converter), at each --outtype (f32, f16, bf16, q8_0);
2. loads each GGUF with llama-cpp-python (CPU) and compares, for each prompt: the tokenization, the greedy
   continuation of --tokens tokens against `transformers`' `generate(do_sample=False)`, and the logits of
   llama.cpp against transformers' over the prompt + continuation (largest absolute difference, and the
   smallest top-1 / top-2 gap of transformers' logits along the way, which says how close a tie came).

The converter identifies a BPE tokenizer's pre-tokenizer by hashing its output on a fixed text, and knows
only published tokenizers; the byte-level BPE that `lrc demo` trains (`lrc.data.tokenizer.train_bpe`, GPT-2's
split regex) is not one of them, so, where the stock lookup fails, this script tells it "gpt-2" (what
llama.cpp's convert_hf_to_gguf_update.py would add for a new tokenizer). Nothing else in the converter is
changed. A student of a published teacher (Llama 3, Qwen) carries that teacher's tokenizer, which it knows.

    pip install llama-cpp-python sentencepiece   # compiles llama.cpp: minutes; e.g. CMAKE_ARGS="-DLLAVA_BUILD=OFF"
    python benchmarks/llama_cpp_check.py --demo --out llama-cpp-out        # trains `lrc demo --quick` first
    python benchmarks/llama_cpp_check.py --model EXPORTED_DIR --out llama-cpp-out

Writes OUT/llama_cpp_check.json and prints a Markdown table. Not a test: it needs the compiled package.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

PROMPTS = ("**HAMLET**  \n", "**KING**  \nWhat news", "**ROMEO**  \nO", "**PORTIA**  \nThe quality of mercy",
           "To be, or not to be")


def llama_cpp_sources(cache: Path, v: str | None = None) -> Path:
    """The llama.cpp tree vendored by llama-cpp-python's sdist (version v; default: the installed one's),
    downloaded once into cache."""
    v = v or version("llama-cpp-python")
    root = cache / f"llama_cpp_python-{v}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={v}", "-d", str(cache)], check=True)
    with tarfile.open(cache / f"llama_cpp_python-{v}.tar.gz") as tar:
        tar.extractall(cache, filter="data")
    return root


def convert(model_dir: Path, out: Path, outtype: str, sources: Path) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py in a child process (it reads sys.argv and exits)."""
    code = f"""
import runpy, sys
sys.path[:0] = [{str(sources)!r}, {str(sources / 'gguf-py')!r}]
import conversion.base as base
stock = base.TextModel.get_vocab_base_pre
def lookup(self, tokenizer):  # the stock lookup first; an unknown byte-level BPE is GPT-2's split
    try:
        return stock(self, tokenizer)
    except NotImplementedError:
        print("converter: pre-tokenizer not in llama.cpp's list; using gpt-2's", file=sys.stderr)
        return "gpt-2"
base.TextModel.get_vocab_base_pre = lookup
sys.argv = ["convert_hf_to_gguf.py", {str(model_dir)!r}, "--outfile", {str(out)!r}, "--outtype", {outtype!r}]
runpy.run_path({str(sources / 'convert_hf_to_gguf.py')!r}, run_name="__main__")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir} ({outtype}):\n{done.stderr[-3000:]}")


def compare(model_dir: Path, gguf: Path, n_tokens: int, threads: int) -> list[dict]:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    # Mistral's sliding window: the stock converter writes Mistral as the llama architecture, without one
    window = getattr(model.config, "sliding_window", None)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, sliding_window=None).eval() \
        if window else None
    n_ctx = min(512, model.config.max_position_embeddings)
    llm = Llama(str(gguf), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads, seed=0)
    rows = []
    try:
        for prompt in PROMPTS:
            ids = tok(prompt, add_special_tokens=False).input_ids
            same_tokens = llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
            with torch.no_grad():
                hf = model.generate(torch.tensor([ids]), max_new_tokens=n_tokens, do_sample=False,
                                    pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
            cpp = []
            llm.reset()
            for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):  # greedy
                cpp.append(int(t))
                if len(cpp) == len(hf):
                    break
            first = next((i for i, (a, b) in enumerate(zip(hf, cpp)) if a != b), None)
            # logits of both over the prompt + transformers' continuation (teacher-forced: same inputs)
            seq = ids + hf
            llm.reset()
            llm.eval(seq)
            cpp_logits = np.asarray(llm.scores[:len(seq)], dtype=np.float64)
            with torch.no_grad():
                hf_logits = model(torch.tensor([seq])).logits[0].double().numpy()
            top2 = np.sort(hf_logits[len(ids) - 1:], axis=-1)[:, -2:]
            gaps = top2[:, 1] - top2[:, 0]  # transformers' top-1 minus top-2 logit at each generated token
            if full is not None:  # the same weights with full attention: what llama.cpp's llama arch computes
                with torch.no_grad():
                    full_logits = full(torch.tensor([seq])).logits[0].double().numpy()
                extra = {"max_abs_logit_diff_full_attention": float(np.abs(cpp_logits - full_logits).max())}
            else:
                extra = {}
            rows.append({**extra, "prompt": prompt, "tokenization_matches": same_tokens, "tokens": len(hf),
                         "greedy_matches": hf == cpp, "first_difference": first,
                         "max_abs_logit_diff": float(np.abs(cpp_logits - hf_logits).max()),
                         "logit_scale": float(np.abs(hf_logits).max()),
                         "min_top1_top2_gap": float(gaps.min()),
                         "gap_at_first_difference": None if first is None else float(gaps[first]),
                         "logit_diff_at_first_difference": None if first is None else float(
                             np.abs(cpp_logits[len(ids) - 1 + first] - hf_logits[len(ids) - 1 + first]).max()),
                         "transformers": tok.decode(hf), "llama_cpp": tok.decode(cpp)})
    finally:
        llm.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, action="append", default=[], help="exported student folder (repeatable)")
    p.add_argument("--demo", action="store_true", help="run `lrc demo --quick` into OUT/demo and check its student")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--outtype", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sources", type=Path, default=None,
                   help="llama.cpp tree with convert_hf_to_gguf.py (default: from the llama-cpp-python sdist)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = list(args.model)
    if args.demo:
        if not (args.out / "demo" / "student").is_dir():  # the demo as a user runs it: its command
            subprocess.run([sys.executable, "-m", "lrc", "demo", "--quick", "--out", str(args.out / "demo")],
                           check=True)
        models.append(args.out / "demo" / "student")
    if not models:
        p.error("give --model DIR or --demo")
    sources = args.sources or llama_cpp_sources(Path.home() / ".cache" / "lrc" / "llama-cpp")
    results = {"llama_cpp_python": version("llama-cpp-python"), "transformers": version("transformers"),
               "converter": str(sources / "convert_hf_to_gguf.py"), "models": []}
    for model_dir in models:
        config = json.loads((model_dir / "config.json").read_text())
        entry = {"model": str(model_dir), "model_type": config["model_type"], "hidden_size": config["hidden_size"],
                 "sliding_window": config.get("sliding_window"),
                 "heads": config["num_attention_heads"], "kv_heads": config.get("num_key_value_heads"),
                 "head_dim": config.get("head_dim"), "dtype": config.get("dtype"), "outtypes": {}}
        for outtype in args.outtype:
            gguf = args.out / f"{model_dir.name}-{outtype}.gguf"
            convert(model_dir, gguf, outtype, sources)
            entry["outtypes"][outtype] = compare(model_dir, gguf, args.tokens, args.threads)
        results["models"].append(entry)
    (args.out / "llama_cpp_check.json").write_text(json.dumps(results, indent=2))

    print("| student | GGUF type | tokenization equal | greedy tokens equal | first difference (top-2 gap there, "
          "logit diff there) | max logit diff | smallest top-2 gap |")
    print("|---|---|---|---|---|---|---|")
    for entry in results["models"]:
        shape = (f"{entry['model_type']}, hidden {entry['hidden_size']}, {entry['heads']} heads x "
                 f"{entry['head_dim']} ({entry['kv_heads']} KV)"
                 + (f", sliding window {entry['sliding_window']}" if entry["sliding_window"] else ""))
        for outtype, rows in entry["outtypes"].items():
            firsts = [f"{r['first_difference']} ({r['gap_at_first_difference']:.1e}, "
                      f"{r['logit_diff_at_first_difference']:.1e})" for r in rows if r["first_difference"] is not None]
            print(f"| {shape} | {outtype} | {sum(r['tokenization_matches'] for r in rows)}/{len(rows)} | "
                  f"{sum(r['greedy_matches'] for r in rows)}/{len(rows)} prompts "
                  f"({sum(r['tokens'] for r in rows)} tokens) | {', '.join(firsts) or '-'} | "
                  f"{max(r['max_abs_logit_diff'] for r in rows):.2e} | "
                  f"{min(r['min_top1_top2_gap'] for r in rows):.2e} |")
            if "max_abs_logit_diff_full_attention" in rows[0]:
                print(f"|  | {outtype}: against transformers without the sliding window | | | | "
                      f"{max(r['max_abs_logit_diff_full_attention'] for r in rows):.2e} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
