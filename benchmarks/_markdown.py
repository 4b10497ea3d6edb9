"""The one writer of benchmark tables into BENCHMARKS.md, shared by the benchmark scripts.

Each script owns a block between its own START/END markers: a rerun replaces that block in place and leaves
the rest of the file (prose, other scripts' blocks) as it is; a first run appends it under `heading`."""

from __future__ import annotations

from pathlib import Path


def write_block(md: Path, start: str, end: str, lines: list[str], heading: str) -> str:
    """Put the block `lines` (from the `start` marker to the `end` one) in place in `md`; returns it."""
    block = "\n".join(lines)
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    md.write_text(text)
    return block
