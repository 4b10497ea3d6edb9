"""Output that looks finished: the start-up summary in words, plurals, counts without exponents, the
--seq-len warning, `lrc plan --help`, lm-eval's git noise, and tokenising progress in logs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import save_teacher, write_data

from lrc import log
from lrc.cli import main
from lrc.config import RunConfig, build_config
from lrc.log import human_count
from lrc.plan.estimate import NOT_PLANNED, plan_from_config
from lrc.plan.report import plan_json
from lrc.train.summary import describe_init, plural

pytestmark = pytest.mark.usefixtures("one_thread", "lrc_cache")


def test_prune_kd_start_up_is_one_readable_summary_with_the_long_sequence_warning(tmp_path, capsys):
    # Catches the raw init dict, "init refit" for prune-kd (which does not refit), "1 steps", and a --seq-len
    # past the teacher's max_position_embeddings (256 for the tiny teachers) passing silently.
    teacher = save_teacher(tmp_path / "teacher")
    data = write_data(tmp_path / "d", "jsonl", n_docs=60)
    assert main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--method", "prune-kd", "--hidden-size", "32", "--seq-len", "300", "--batch-size", "2",
                 "--max-steps", "1", "--precision", "fp32", "--calib-batches", "1", "--eval-batches", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("start-up:"):out.index("teacher held-out loss")]
    for label in ("teacher", "student", "init", "data", "budget", "lr"):
        assert f"\n  {label} " in summary
    assert "{" not in summary and "refit" not in summary and "pruned: kept the teacher's 32" in summary
    assert "1 step on 1 x cpu" in summary and "1 steps" not in out and "done: 1 step," in out
    assert "warning: --seq-len 300 is longer than the teacher's max_position_embeddings (256)" in out


def test_init_and_counts_in_words():
    lrc = describe_init("lrc", "refit", {"energy_kept": 0.9461, "heldout_kl_pca": 0.001, "heldout_kl_refit": 0.0006,
                                         "heldout_tokens": 2048, "ridge": 0.001, "refit_kept": True,
                                         "something_new": 3})
    assert lrc == ("refit: 94.6% of the teacher's residual-stream energy kept; KL to the teacher on 2,048 held-out "
                   "calibration tokens 0.001 after pca, 0.0006 after refit (refit kept); something new 3")
    assert describe_init("kd", "refit", {}) == ""
    assert [plural(n, "step") for n in (0, 1, 2, 12000)] == ["0 steps", "1 step", "2 steps", "12,000 steps"]
    assert [human_count(n) for n in (18_860_000_000, 350e6, 50_208, 7)] == ["18.9B", "350M", "50.2K", "7"]


def _plan_teacher(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                dtype="bfloat16").save_pretrained(tmp_path / "t")
    return tmp_path / "t"


def test_plan_help_lists_only_what_changes_a_plan_and_accepts_the_rest(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    listed = {words[0].rstrip(",") for words in lines if words and words[0].startswith("--")}
    assert {"--hidden-size", "--max-tokens", "--seq-len"} <= listed
    assert not {f"--{name.replace('_', '-')}" for name in NOT_PLANNED} & listed
    # each hidden option really changes nothing in the plan (else it must be listed)
    from transformers import AutoConfig

    teacher = _plan_teacher(tmp_path)
    config = AutoConfig.from_pretrained(teacher)
    base = dict(teacher=str(teacher), hidden_size=256, max_tokens=10**6)
    want = plan_json(plan_from_config(config, build_config(base), device="cpu", heap_slack=False))
    changed = {"data": ["x"], "text_field": "body", "num_proc": 4, "streaming": True, "chat_template": "t.jinja",
               "train_on": "assistant", "out": "o", "init": "pca", "calib_batches": 3, "lr": 1e-3,
               "schedule": "linear", "warmup_ratio": 0.3, "min_lr_ratio": 0.1, "weight_decay": 0.1,
               "adam_beta1": 0.8, "adam_beta2": 0.95, "grad_clip": 0.5, "seed": 3, "ce_weight": 2.0,
               "kl_temperature": 4.0, "log_every": 3, "eval_every": 3, "eval_batches": 3, "save_every": 3,
               "keep_checkpoints": 1, "wandb": "p", "cache_dir": "c"}
    assert set(changed) == NOT_PLANNED
    for name, value in changed.items():
        cfg = RunConfig(**{**base, name: value})
        assert plan_json(plan_from_config(config, cfg, device="cpu", heap_slack=False)) == want, name
    assert main(["plan", "--teacher", str(teacher), "--hidden-size", "256", "--data", "x.jsonl", "--lr", "1e-3",
                 "--out", "o", "--json"]) == 0


def test_plan_gives_the_time_for_the_budget(tmp_path, capsys):
    teacher = _plan_teacher(tmp_path)
    argv = ["plan", "--teacher", str(teacher), "--hidden-size", "256", "--max-tokens", "1000000000",
            "--device", "cuda", "--device-tflops", "100", "--nproc", "2"]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget_tokens"] == 10**9
    assert plan["hours"] == pytest.approx(10**9 / (plan["tokens_per_s"] * 2) / 3600)
    assert main(argv) == 0
    assert "time for 1B tokens (the budget): " in capsys.readouterr().out


def test_lm_eval_git_lookup_is_quiet_outside_a_checkout(tmp_path, monkeypatch, capfd):
    # lm-eval runs `git describe` with the user's stderr: "fatal: not a git repository" on every `lrc eval
    # --tasks` outside a checkout. run_tasks swaps in a quiet lookup while lm-eval runs.
    import lm_eval
    import lm_eval.evaluator

    from lrc.eval.tasks import TaskSpec, run_tasks

    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_evaluate(**kw):
        seen["hash"] = lm_eval.evaluator.get_git_commit_hash()
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.setattr("lm_eval.models.huggingface.HFLM", lambda **kw: None)
    original = lm_eval.evaluator.get_git_commit_hash
    run_tasks(None, None, TaskSpec(specs=(), names=(), needs_hub=()), None)
    assert "hash" in seen and "fatal" not in capfd.readouterr().err
    assert lm_eval.evaluator.get_git_commit_hash is original  # restored


def test_tokenising_progress_is_plain_lines_in_a_log(tmp_path):
    # Not a terminal (a log file): lines, not a redrawn bar; the end line gives documents, tokens and speed.
    code = ("import logging, sys; from lrc import log; log.configure(0);"
            "from lrc.data.tokenise import DataProgress;"
            "p = DataProgress(10, True, every_s=0); p.update(4, 400); p.update(6, 600); p.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("tokenising: 4 of 10 documents, 400 tokens")
    assert lines[-1].startswith("tokenised 10 documents, 1,000 tokens in ") and "\r" not in out.stdout + out.stderr
    log.configure(0)
