"""The demo pipeline at a tiny size: report, plot and a loadable exported student."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from lrc.cli import main


@pytest.mark.slow
def test_tiny_demo_writes_report_plot_and_student(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for name in ("teacher", "LRC student", "scratch student"):
        assert f"| {name} |" in report
    assert "perplexity" in report and "heldout_loss.png" in report
    assert "| next-line acc | next-line acc_norm |" in report
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        assert "Next-line accuracy: not measured" in report
    else:  # every model has a measured accuracy on the shipped task's first 8 items (a multiple of 1/8)
        results = json.loads((out / "results.json").read_text())
        for name in ("teacher", "LRC student", "scratch student"):
            acc = results[name]["next_line"]
            assert acc["samples"] == 8 and (acc["acc"] * 8).is_integer() and (acc["acc_norm"] * 8).is_integer()
            row = next(line for line in report.splitlines() if line.startswith(f"| {name} |")).split(" | ")
            assert row[5:7] == [f"{acc['acc']:.3f}", f"{acc['acc_norm']:.3f}"]
    png = (out / "heldout_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    teacher_dirs = list((tmp_path / "cache" / "demo").glob("teacher-*/teacher"))
    assert len(teacher_dirs) == 1
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dirs[0])
    assert model.config.hidden_size * 2 == teacher.config.hidden_size
    assert str(out / "report.md") in capsys.readouterr().out
    # a second run reuses the cached teacher
    assert main(["demo", "--tiny", "--out", str(tmp_path / "again")]) == 0
    assert "reusing the cached teacher" in capsys.readouterr().out
