"""`lrc eval` side by side: the shipped next-line task, the table against a hand count, task-name errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import save_teacher, write_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrc.cli import main
from lrc.data.plays import HELD_OUT, play_files
from lrc.eval.next_line import TASK, build_items, task_yaml
from lrc.eval.table import format_markdown, format_text


def test_next_line_items_are_deterministic_and_the_answer_really_comes_next():
    items = build_items()
    assert items == build_items()
    assert len(items) == 50 * len(HELD_OUT) and {i["play"] for i in items} == set(HELD_OUT)
    texts = {p.stem: p.read_text().split("\n") for p in play_files()[1]}
    for item in items:
        lines = texts[item["play"]]
        answer = item["choices"][item["label"]]
        assert lines[item["line"]].strip() == answer  # the line right after the context in the play
        assert "\n".join(lines[:item["line"]]).endswith(item["context"][:-1])
        assert len(set(item["choices"])) == 4 and all(c.strip() == c and c for c in item["choices"])
    # the answer's position is spread over the four slots, so a model that always picks one slot gets ~25%
    counts = [sum(i["label"] == k for i in items) for k in range(4)]
    assert min(counts) > len(items) / 8, counts


def test_table_formats():
    records = [{"model": "a", "parameters": 1234, "loss": 2.0, "perplexity": math.exp(2.0),
                "tasks": {"t": {"acc": 0.5, "acc_norm": 0.25, "samples": 4}, "u": {"acc": 1.0}}},
               {"model": "bb", "parameters": 99, "tasks": {"t": {"acc": 0.75, "acc_norm": 0.5}}}]
    text = format_text(records).splitlines()
    assert text[0].split() == ["model", "parameters", "loss", "ppl", "t", "acc", "t", "acc_norm", "u", "acc"]
    assert text[2].split() == ["a", "1,234", "2.0000", "7.39", "0.5000", "0.2500", "1.0000"]
    assert text[3].split() == ["bb", "99", "-", "-", "0.7500", "0.5000", "-"]
    md = format_markdown(records).splitlines()

    def cells(line: str) -> list[str]:
        assert line.startswith("|") and line.endswith("|"), line
        return [c.strip() for c in line[1:-1].split("|")]

    assert cells(md[0]) == ["model", "parameters", "loss", "ppl", "t acc", "t acc_norm", "u acc"]
    assert cells(md[1])[0].startswith(":") and all(c.endswith(":") and not c.startswith(":") for c in cells(md[1])[1:])
    assert cells(md[3]) == ["bb", "99", "-", "-", "0.7500", "0.5000", "-"]
    assert len(md) == 4


def _hand_count(model_dir, items) -> tuple[float, float]:
    """acc and acc_norm by hand: the sum of each choice's token log-probabilities after the context (the
    context's trailing newline moved onto the choice, as lm-eval does), acc_norm divided by characters."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    acc = norm = 0
    for item in items:
        ctx = item["context"].rstrip()
        lls = []
        for choice in item["choices"]:
            n_ctx = len(tok.encode(ctx))
            ids = tok.encode(item["context"] + choice)
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            lls.append(sum(float(logp[i - 1, ids[i]]) for i in range(n_ctx, len(ids))))
        acc += max(range(4), key=lambda k: lls[k]) == item["label"]
        norm += max(range(4), key=lambda k: lls[k] / len(item["choices"][k])) == item["label"]
    return acc / len(items), norm / len(items)


@pytest.mark.slow
def test_two_models_on_the_shipped_task_match_a_hand_count(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    a, b = save_teacher(tmp_path / "a"), save_teacher(tmp_path / "b", tied=True)
    data = write_data(tmp_path / "data")
    n = 8
    md = tmp_path / "table.md"
    assert main(["eval", str(a), str(b), "--tasks", TASK, "--limit", str(n), "--data", str(data),
                 "--seq-len", "32", "--device", "cpu", "--json", "--markdown", str(md)]) == 0
    records = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    items = [json.loads(line) for line in (task_yaml().parent / "test.jsonl").read_text().splitlines()][:n]
    assert items == build_items()[:n]
    table = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in md.read_text().splitlines()]
    hand = []
    for record, model_dir in zip(records, (a, b)):
        assert record["model"] == str(model_dir) and record["tokens"] > 0
        assert record["parameters"] == AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
        got = record["tasks"][TASK]
        assert got["samples"] == n
        acc, acc_norm = _hand_count(model_dir, items)
        hand.append((acc, acc_norm))
        assert got["acc"] == pytest.approx(acc) and got["acc_norm"] == pytest.approx(acc_norm)
        assert [str(model_dir), f"{record['parameters']:,}", f"{record['loss']:.4f}", f"{record['perplexity']:.2f}",
                f"{acc:.4f}", f"{acc_norm:.4f}"] in table
    # the hand counts tell the two models and the two metrics apart, so a swap in the table would show
    assert len({x for pair in hand for x in pair}) > 1, hand


@pytest.mark.parametrize("argv,needle", [
    # indexing lm-eval's ~10,000 built-in task files takes ~10 s
    pytest.param(["--tasks", "arc_easyy"], "unknown task 'arc_easyy'", marks=pytest.mark.slow),
    (["--tasks", "missing.yaml"], "task file missing.yaml does not exist"),
    ([], "give --data FILES"),
    (["--limit", "0", "--tasks", TASK], "--limit must be positive"),
    (["--limit", "3", "--data", "x"], "--num-fewshot and --limit apply to --tasks"),
])
def test_eval_task_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, needle):
    if "arc_easyy" in argv:
        pytest.importorskip("lm_eval")
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    model = save_teacher(tmp_path / "m")
    capsys.readouterr()  # saving prints a progress bar
    assert main(["eval", str(model), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_eval_tasks_without_lm_eval_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    model = save_teacher(tmp_path / "m")
    capsys.readouterr()  # saving prints a progress bar
    assert main(["eval", str(model), "--device", "cpu", "--tasks", TASK]) == 2
    err = capsys.readouterr().err
    assert "needs lm-eval" in err and "lowrankclone[eval]" in err and err.count("\n") == 1


@pytest.mark.slow
def test_paper_tasks_offline_say_they_need_the_network(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))  # nothing cached
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    model = save_teacher(tmp_path / "m")
    capsys.readouterr()  # saving prints a progress bar
    assert main(["eval", str(model), "--device", "cpu", "--tasks", "paper"]) == 2
    err = capsys.readouterr().err
    assert "need the network" in err and "arc_easy" in err and "mmlu" in err and err.count("\n") == 1, err
