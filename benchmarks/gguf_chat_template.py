"""Does llama.cpp's GGUF of an exported chat student carry its chat template? Convert, read back, compare.

Converts an `lrc export` folder with llama.cpp's own `convert_hf_to_gguf.py` (from the llama.cpp sources the
llama-cpp-python sdist vendors, as `llama_cpp_check.py` does; the conversion is pure Python, nothing is
compiled), then reads the GGUF's metadata with the vendored `gguf` package and checks that
`tokenizer.chat_template` is the export's `chat_template.jinja`, character for character. It prints the
tokenizer metadata llama.cpp will serve the model with.

    pip install gguf sentencepiece   # what the converter imports besides torch/transformers
    python benchmarks/gguf_chat_template.py --model EXPORTED_DIR --out gguf-out

Not a test: it downloads the llama-cpp-python sdist (about 75 MB) once into OUT/sources.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama_cpp_check import convert, llama_cpp_sources


def read_tokenizer_metadata(gguf_file: Path, sources: Path) -> dict:
    """The GGUF's tokenizer.* scalar fields (not the vocabulary arrays)."""
    sys.path.insert(0, str(sources / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.") and k not in skip}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an `lrc export` folder of a chat run")
    p.add_argument("--out", required=True, help="folder for the GGUF, the sources and gguf_chat_template.json")
    p.add_argument("--llama-cpp-version", default=None,
                   help="llama-cpp-python sdist whose llama.cpp converts (default: the installed package's)")
    a = p.parse_args()
    model, out = Path(a.model), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = llama_cpp_sources(out / "sources", a.llama_cpp_version)
    gguf_file = out / "student-f32.gguf"
    convert(model, gguf_file, "f32", sources)
    meta = read_tokenizer_metadata(gguf_file, sources)
    want = (model / "chat_template.jinja").read_text(encoding="utf-8")
    carried = meta.get("tokenizer.chat_template") == want
    result = {"model": str(model), "gguf": str(gguf_file), "template_carried": carried, "tokenizer_metadata": meta}
    (out / "gguf_chat_template.json").write_text(json.dumps(result, indent=1))
    for k, v in meta.items():
        print(f"{k}: {v!r}")
    print(f"tokenizer.chat_template is the export's chat_template.jinja: {result['template_carried']}")
    return 0 if result["template_carried"] else 1


if __name__ == "__main__":
    sys.exit(main())
