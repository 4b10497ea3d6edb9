"""`--json` commands write only JSON to stdout (informative lines go to stderr), and `lrc eval` measures every
model of one table on the same token windows."""

from __future__ import annotations

import json

from helpers import save_teacher, write_data

from lrc.cli import build_parser, main

TESTED = {"plan", "eval", "bench", "runs"}


def test_every_json_command_is_tested():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    with_json = {name for name, p in sub.choices.items() if any("--json" in a.option_strings for a in p._actions)}
    assert with_json == TESTED


def _only_json(capsys, argv):
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # fails on any extra line


def test_bench_json_is_alone_on_stdout(capsys, monkeypatch):
    import lrc.cli

    def fake(**kwargs):
        print("small accum 1: overhead 1.5")  # what the real one prints per row
        return [{"shape": "small"}]

    monkeypatch.setattr(lrc.cli, "run_bench", fake)  # the name `lrc bench` calls
    assert _only_json(capsys, ["bench", "--shapes", "small", "--json"]) == [{"shape": "small"}]


def test_plan_and_eval_json_and_one_set_of_windows(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    teacher = save_teacher(tmp_path / "teacher")
    data = write_data(tmp_path / "d", "jsonl")
    plan = _only_json(capsys, ["plan", "--teacher", teacher, "--hidden-size", "32", "--json"])
    assert isinstance(plan, dict)
    # The case: "documents are framed as ..." printed on stdout before the JSON.
    assert main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4", "--max-steps", "1",
                 "--calib-batches", "1", "--eval-batches", "1", "--device", "cpu"]) == 0
    capsys.readouterr()
    rows = _only_json(capsys, ["eval", teacher, tmp_path / "run", "--data", data, "--json", "--device", "cpu"])
    assert len({r["tokens"] for r in rows}) == 1, rows  # the teacher at the run's --seq-len 32, not 512
    alone = _only_json(capsys, ["eval", teacher, "--data", data, "--seq-len", "32", "--json", "--device", "cpu"])
    assert alone["tokens"] == rows[0]["tokens"]
    listing = _only_json(capsys, ["runs", tmp_path / "run", "--json"])
    assert [c["step"] for c in listing["checkpoints"]] == [1]
