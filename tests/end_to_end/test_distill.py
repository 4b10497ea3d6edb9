"""`lrc distill / export / eval` end to end on a tiny teacher saved to disk: learning, export, eval, config
files, baselines, exact resume (also after SIGTERM and SIGKILL) and torchrun data parallelism on CPU."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import env, records, run, save_teacher, write_data
from safetensors.torch import load_file

from lrc.cli import main
from lrc.optim.lr_rule import free_lr_from_start
from lrc.train import checkpoint as ckpt

COMMON = ["--method", "lrc",
          "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4", "--precision", "fp32",
          "--lr", "3e-3", "--calib-batches", "2", "--eval-batches", "2", "--log-every", "1"]
LOGGED = ("step", "tokens", "loss", "ce", "kl", "clone", "lr", "grad_norm")
# one OpenMP thread (conftest.one_thread); runs write their caches under this module's folder
pytestmark = pytest.mark.usefixtures("one_thread", "lrc_cache")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "llama", "llama", tied=False)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {kind: write_data(root / kind, kind) for kind in ("txt", "jsonl", "parquet")}


def distill(teacher, data, out, *extra) -> Path:
    run("distill", "--teacher", teacher, "--data", data, "--out", out, *COMMON, *extra)
    return Path(out)


def distill_cmd(teacher, data, out, *extra) -> list[str]:
    return [str(a) for a in ("distill", "--teacher", teacher, "--data", data, "--out", out, *COMMON, *extra)]


def logged(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in LOGGED} for r in records(run_dir)]


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    if ckpt.is_sharded_checkpoint(last):  # --parallel fsdp under torchrun: torch.distributed.checkpoint shards
        return ckpt.load_checkpoint(last, torch.device("cpu"))[0]
    return load_file(str(last / "trainable.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------- help


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for command in ("distill", "export", "runs", "eval"):
        assert command in top

    from lrc.config import FIELDS

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in text, name
    assert "--kl-temperature KL_TEMPERATURE KL temperature tau (default: 1.0)" in text
    assert "(default: auto)" in text  # --lr
    assert "--config" in text and "--resume" in text
    assert text.count("(default:") >= len(FIELDS) + 2  # every option, --config and --resume included
    assert "(default: the teacher's) (default:" not in text  # one default per option

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "(default: the dtype the teacher is stored in)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 4)" in text and text.count("(default:") == 12  # one per option but --help


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_distill_export_eval(kind, tmp_path, teacher, datasets, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = datasets[kind]
    out = distill(teacher, data, tmp_path / "run", "--max-steps", "30", "--eval-every", "0")
    train = records(out)
    assert [r["step"] for r in train] == list(range(1, 31))
    assert train[-1]["loss"] < train[0]["loss"] - 0.1, (train[0]["loss"], train[-1]["loss"])
    val = records(out, "val")
    assert [r["step"] for r in val] == [0, 30]
    assert val[-1]["loss"] < val[0]["loss"] - 0.1, val
    assert len(records(out, "val_teacher")) == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["hidden_size"] == 32 and saved["max_steps"] == 30 and saved["data"] == [str(data)]

    model_dir = tmp_path / "model"
    run("export", out, "--out", model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.hidden_size == 32 and model.config.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok("the king and the queen")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()

    capsys.readouterr()
    run("eval", model_dir, "--data", data, "--seq-len", "32", "--json", "--device", "cpu")
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"loss", "perplexity", "tokens"} <= exported.keys()
    assert exported["tokens"] > 0 and exported["perplexity"] == pytest.approx(2.718281828 ** exported["loss"])
    # The run directory evaluates to the same numbers as its export.
    run("eval", out, "--data", data, "--json", "--device", "cpu")
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert direct["tokens"] == exported["tokens"]
    assert direct["loss"] == pytest.approx(exported["loss"], rel=1e-4)
    if kind == "txt" and importlib.util.find_spec("lm_eval"):
        # a run directory with --tasks (exported in memory) scores as its export, in one table
        run("eval", out, model_dir, "--tasks", "lrc_next_line", "--limit", "4", "--json", "--device", "cpu")
        both = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert [r["model"] for r in both] == [str(out), str(model_dir)]
        direct, exported = (r["tasks"]["lrc_next_line"] for r in both)
        assert direct == pytest.approx(exported) and direct["samples"] == 4


def test_max_steps_zero_initialises_and_saves(tmp_path, teacher, datasets):
    out = distill(teacher, datasets["txt"], tmp_path / "run", "--max-steps", "0")
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000000"]
    assert (out / "checkpoints" / ckpts[0] / "trainable.safetensors").is_file()
    assert json.loads((out / "checkpoints" / ckpts[0] / "state.json").read_text())["step"] == 0
    assert records(out) == [] and [r["step"] for r in records(out, "val")] == [0]
    run("export", out, "--out", tmp_path / "model")  # the initialised student is a usable model
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_config_file_with_command_line_overrides(tmp_path, teacher, datasets):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "teacher": str(teacher), "data": [str(datasets["jsonl"])], "out": str(tmp_path / "run"),
        "hidden-size": 32, "seq_len": 32, "batch_size": 4, "max_steps": 5, "lr": 1e-3,
        "kl_temperature": 2.0, "precision": "fp32", "log_every": 1, "calib_batches": 2, "eval_batches": 2,
    }))
    run("distill", "--config", cfg_file, "--max-steps", "2", "--lr", "3e-3", "--hidden-size", "16")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["lr"] == 3e-3 and saved["hidden_size"] == 16  # command line
    assert saved["kl_temperature"] == 2.0 and saved["seq_len"] == 32  # file
    assert saved["clone_weight"] == 0.2  # default
    assert saved["method"] == "kd" and saved["ce_weight"] == 0.25 and saved["min_lr_ratio"] == 0.1  # its own
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]
    assert records(tmp_path / "run")[0]["lr"] == pytest.approx(3e-3)


@pytest.mark.parametrize("method", ["kd", "scratch", "prune-kd"])
def test_baseline_methods(method, tmp_path, teacher, datasets):
    from transformers import AutoModelForCausalLM

    out = distill(teacher, datasets["txt"], tmp_path / "run", "--method", method, "--max-steps", "2")
    train = records(out)
    assert [r["step"] for r in train] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    if method == "scratch":
        assert train[-1]["kl"] == 0.0
    run("export", out, "--out", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.hidden_size == 32


def test_the_default_method_is_kd_from_lrcs_start(tmp_path, teacher, datasets):
    """No --method: an ordinary student, started as LRC's (refit) and trained by KD at the free-weight lr rule,
    with no clone terms; it exports as a plain model."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run("distill", "--teacher", teacher, "--data", datasets["txt"], "--out", out, "--hidden-size", "32",
        "--seq-len", "32", "--batch-size", "4", "--precision", "fp32", "--calib-batches", "2", "--eval-batches",
        "2", "--log-every", "1", "--max-steps", "2")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["method"], saved["init"], saved["keep_clone_terms"]) == ("kd", "refit", False)
    init = records(out, "init")[0]  # the start's KL to the teacher sets the step (lrc.optim.lr_rule)
    start_kl = init["heldout_kl_refit"] if init["refit_kept"] else init["heldout_kl_pca"]
    assert saved["lr"] == free_lr_from_start(32, start_kl, 4 * 32)
    train = records(out)
    assert [r["step"] for r in train] == [1, 2] and all("clone" not in r and r["kl"] > 0 for r in train)
    weights = load_file(str(out / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert any(name.endswith("self_attn.q_proj.weight") for name in weights)  # the student's own weights
    run("export", out, "--out", tmp_path / "model")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.hidden_size == 32


# ------------------------------------------------------------------------------------------- exact resume


def test_resume_matches_a_straight_run(tmp_path, teacher, datasets):
    # A constant schedule: the learning-rate schedule is defined by --max-steps, so a run planned for N steps
    # and then extended to 2N follows another schedule than one planned for 2N from the start.
    args = ("--schedule", "constant", "--save-every", "2")
    straight = distill(teacher, datasets["txt"], tmp_path / "straight", "--max-steps", "8", *args)
    split = distill(teacher, datasets["txt"], tmp_path / "split", "--max-steps", "4", *args)
    assert [r["step"] for r in records(split)] == [1, 2, 3, 4]
    run("distill", "--out", split, "--resume", "--max-steps", "8")
    assert logged(split) == logged(straight)
    assert [r["step"] for r in records(split)] == list(range(1, 9))
    assert_same_weights(last_weights(split), last_weights(straight))
    assert yaml.safe_load((split / "config.yaml").read_text())["max_steps"] == 8

    # A line torn by a crash mid-write does not stop the next resume.
    with (split / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "step": 9, "lo')
    run("distill", "--out", split, "--resume", "--max-steps", "9")
    assert [r["step"] for r in records(split)] == list(range(1, 10))


STEPS = 60  # long enough (~1-2 s of training) that a signal sent at the first record lands mid-run


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, teacher, datasets, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRC_CACHE", str(cache_dir))
        distill(teacher, datasets["txt"], out, "--max-steps", STEPS, "--eval-every", "0")
    return out


def start(cmd: list[str], cache_dir: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "lrc", *cmd], stdout=f, stderr=subprocess.STDOUT,
                                env=env(cache_dir))


def wait_for(proc: subprocess.Popen, ready, log: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"lrc exited ({proc.returncode}) before the signal could be sent:\n{log.read_text()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for progress:\n{log.read_text()}")
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches(tmp_path, teacher, datasets, cache_dir, straight_run):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(distill_cmd(teacher, datasets["txt"], out, "--max-steps", STEPS, "--eval-every", "0"),
                 cache_dir, log)
    metrics = out / "metrics.jsonl"
    wait_for(proc, lambda: metrics.is_file() and '"train"' in metrics.read_text(), log)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert rc == 128 + signal.SIGTERM, text  # saved, but not finished: `&&` chains must stop
    assert "interrupted at step" in text, text
    stopped = int(text.split("interrupted at step ")[1].split(":")[0])
    assert 1 <= stopped < STEPS
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"step-{stopped:08d}"]  # --save-every 500: the one checkpoint is the signal's
    assert records(out)[-1]["step"] == stopped

    run("distill", "--out", out, "--resume")  # continues to the saved --max-steps
    assert logged(out) == logged(straight_run)
    assert_same_weights(last_weights(out), last_weights(straight_run))


@pytest.mark.slow
def test_sigkill_then_resume_matches(tmp_path, teacher, datasets, cache_dir, straight_run):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(distill_cmd(teacher, datasets["txt"], out, "--max-steps", STEPS, "--eval-every", "0",
                             "--save-every", "1"), cache_dir, log)
    wait_for(proc, lambda: any((out / "checkpoints").glob("step-*")), log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert int(last.name.split("-")[1]) < STEPS, "the run finished before it was killed"

    run("distill", "--out", out, "--resume")
    assert logged(out) == logged(straight_run)
    assert_same_weights(last_weights(out), last_weights(straight_run))


# ------------------------------------------------------------------------------------------- torchrun


PARALLEL = {  # all with the generated weights reused over two micro-batches
    "ddp": ("--grad-accum", "2"),
    # the teacher sharded with FSDP2: untied Llama, and tied Qwen3 (head = embedding shards, q/k norms)
    "fsdp": ("--parallel", "fsdp", "--grad-accum", "2"),
    "fsdp-qwen3-tied": ("--parallel", "fsdp", "--grad-accum", "2"),
    # a teacher stored in bf16 computing in fp32: FSDP2's mixed-precision policy casts each gathered layer
    "fsdp-bf16-teacher": ("--parallel", "fsdp", "--grad-accum", "2", "--teacher-dtype", "bfloat16"),
    # a baseline: its gradients are averaged over ranks the same way (no DDP wrapper)
    "ddp-kd": ("--method", "kd", "--grad-accum", "2"),
    # the default method at --lr auto: the step comes from the start's KL, rank 0's on every rank
    "ddp-kd-auto-lr-refit": ("--method", "kd", "--grad-accum", "2", "--lr", "auto"),
    # a narrower FFN (Q generated from a sharded W_T) and a layer chosen on the sharded teacher
    "fsdp-ffn-depth": ("--parallel", "fsdp", "--grad-accum", "2", "--ffn-size", "48", "--layers", "1"),
    # the default init (refit) on a sharded bf16 teacher: its least squares call teacher modules outside their forward
    "fsdp-bf16-refit": ("--parallel", "fsdp", "--grad-accum", "2", "--teacher-dtype", "bfloat16", "--init", "refit"),
}
# Every variant but the refit one starts from pca: the parallel runs calibrate on the same sequences as the
# single run but in batches of 4 instead of 8, and refit's least squares carry the different rounding of those
# sums into the start (ranks still agree: they take rank 0's), past the 1e-3 weight tolerance after four steps.
PCA_START = ("--init", "pca")


@pytest.fixture(scope="module")
def qwen3_tied_teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "qwen3", "qwen3", tied=True)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", sorted(PARALLEL))
def test_torchrun_two_processes_match_one(parallel, tmp_path, teacher, qwen3_tied_teacher, datasets, cache_dir):
    if parallel == "fsdp-qwen3-tied":
        teacher = qwen3_tied_teacher
    steps = ("--max-steps", "4", "--save-every", "2", "--eval-every", "2",
             *(() if parallel.endswith("refit") else PCA_START), *PARALLEL[parallel])
    single = distill(teacher, datasets["txt"], tmp_path / "single", "--batch-size", "8", *steps)

    out = tmp_path / parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lrc", *distill_cmd(teacher, datasets["txt"], out, *steps), "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(cache_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("done: 4 steps") == 1, proc.stdout  # rank 0 prints, rank 1 does not
    if parallel.startswith("fsdp"):  # each process holds half of the teacher (up to padding of odd shapes)
        held, whole = (float(x) for x in re.search(r"([\d.,]+) MiB of ([\d.,]+) MiB", proc.stdout).groups())
        assert held == pytest.approx(whole / 2, rel=0.02), proc.stdout

    if "auto-lr" in parallel:  # one step size, from rank 0's measured start, equal to the single run's
        assert (yaml.safe_load((out / "config.yaml").read_text())["lr"]
                == yaml.safe_load((single / "config.yaml").read_text())["lr"])
    a, b = records(single), records(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ("loss", "ce", "kl", "clone", "grad_norm"):
            if k in ra:  # baselines have no clone term
                assert rb[k] == pytest.approx(ra[k], rel=1e-4), (rb["step"], k)
    for ra, rb in zip(records(single, "val"), records(out, "val"), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)

    # Only rank 0 wrote: one metrics file with no repeated records, each checkpoint written once.
    assert sorted(p.name for p in out.rglob("metrics.jsonl")) == ["metrics.jsonl"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    keys = [(json.loads(line)["split"], json.loads(line)["step"]) for line in lines]
    assert len(keys) == len(set(keys)) == (len(records(single, "train")) + len(records(single, "val")) + 1
                                           + len(records(single, "init")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "commands.txt", "config.yaml", "metrics.jsonl"]
    for k, v in last_weights(single).items():
        if not parallel.endswith("refit"):  # see PCA_START; its losses above agree to 1e-4
            assert torch.allclose(last_weights(out)[k], v, rtol=1e-3, atol=1e-5), k



def test_a_loss_rising_far_above_its_start_stops_the_run_naming_the_lr(tmp_path, teacher, datasets, capsys):
    # Catches a run that goes on training with a learning rate far too high (only a non-finite loss stopped it).
    from lrc.cli import main

    out = tmp_path / "run"
    argv = distill_cmd(teacher, datasets["txt"], out, "--max-steps", "12", "--warmup-ratio", "0")
    argv[argv.index("--lr") + 1] = "3"
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the loss rose from" in err and "learning rate 3 (--lr)" in err and "--stop-on-rise 0" in err
    argv[argv.index("--out") + 1] = str(tmp_path / "run2")
    assert main(argv + ["--stop-on-rise", "0"]) == 0  # and it can be told to train on


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_accumulation_of_uneven_assistant_masks_matches_one_batch(parallel, tmp_path, teacher, cache_dir):
    """2 processes x --batch-size 2 --grad-accum 2 == 1 process --batch-size 8 on chat data with assistant-only
    targets: every term is a mean over the step's tokens, across micro-batches and processes (per micro-batch
    means would weigh a micro-batch with a few assistant tokens like a full one)."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}")
    words = "the king queen castle night river gold field wind rose love death honour ghost storm".split()
    rows = []
    for i in range(60):  # answers from 1 to 40 words: very uneven numbers of target tokens per sequence
        answer = " ".join(words[(i * 7 + j) % len(words)] for j in range(1 + (i * 13) % 40))
        rows.append({"messages": [{"role": "user", "content": words[i % len(words)]},
                                  {"role": "assistant", "content": answer}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = ("--chat-template", template, "--train-on", "assistant", "--max-steps", "3", *PCA_START)
    single = distill(teacher, data, tmp_path / "single", *chat, "--batch-size", "8")
    out = tmp_path / parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lrc",
           *distill_cmd(teacher, data, out, *chat), "--batch-size", "2", "--grad-accum", "2",
           *(("--parallel", "fsdp") if parallel == "fsdp" else ())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(cache_dir), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for ra, rb in zip(records(single), records(out), strict=True):
        for k in ("loss", "ce", "kl", "clone", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4), (rb["step"], k)


def test_distill_with_gradient_checkpointing_equals_the_run_without(teacher, datasets, tmp_path):
    """--grad-checkpointing generates each student layer inside its checkpointed forward (and again in
    backward, per micro-batch): the logged losses and gradient norms equal the run without it, which generates
    all layers once per step and reuses them over --grad-accum 2 (the cost model may pick other factored roles
    under checkpointing, where nothing is reused: same values, other order of operations)."""
    steps = ("--max-steps", "3", "--grad-accum", "2", "--batch-size", "2")
    plain = distill(teacher, datasets["txt"], tmp_path / "plain", *steps)
    ckpt_run = distill(teacher, datasets["txt"], tmp_path / "ckpt", *steps, "--grad-checkpointing")
    a, b = records(plain), records(ckpt_run)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "ce", "kl", "clone", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5), (rb["step"], k)
    wa, wb = last_weights(plain), last_weights(ckpt_run)
    assert wa.keys() == wb.keys()
    for k in wa:
        # AdamW amplifies op-order noise (most on entries near zero: seen 8e-5 on one entry of 2048)
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=2e-4)
