"""From a run to a model people use: a chat run's export answers through its chat template exactly as the
student did in training, carries a model card and the teacher's licence files; any kept checkpoint exports;
`lrc runs` lists them with their held-out losses."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import make_teacher
from helpers import corpus, run
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrc.cli import main
from lrc.data import build_packed_dataset
from lrc.data.tokenizer import train_bpe
from lrc.eval.models import evaluate_models
from lrc.train.heldout import heldout_loss, model_loss
from lrc.train.run import load_run

pytestmark = pytest.mark.usefixtures("one_thread", "lrc_cache")

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CARD = "---\nlicense: apache-2.0\nbase_model: someone/tiny-teacher\n---\n# the teacher\n"
COMMON = ["--method", "lrc",
          "--hidden-size", "32", "--seq-len", "64", "--batch-size", "4", "--precision", "fp32", "--calib-batches",
          "1", "--eval-batches", "2", "--device", "cpu", "--max-steps", "2", "--save-every", "1", "--eval-every", "1",
          "--keep-checkpoints", "0"]


def _conversations(n: int = 40) -> list[list[dict]]:
    out = []
    for doc in corpus(n):
        words = doc.split()
        out.append([{"role": "user", "content": " ".join(words[:6])},
                    {"role": "assistant", "content": " ".join(words[6:24])}])
    return out


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, cache_dir):
    """A 2-step LRC run on chat rows with --chat-template FILE (the teacher's tokenizer has none) and
    --train-on assistant; the teacher folder has a card with a licence, a LICENSE and a NOTICE."""
    import os

    os.environ["LRC_CACHE"] = str(cache_dir)
    root = tmp_path_factory.mktemp("chat")
    tok = train_bpe(corpus(), vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    teacher = root / "teacher"
    make_teacher("llama", False, vocab_size=len(tok)).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    (teacher / "README.md").write_text(CARD)
    (teacher / "LICENSE").write_text("the teacher's licence\n")
    (teacher / "NOTICE").write_text("the teacher's notice\n")
    template = root / "chat.jinja"
    template.write_text(TEMPLATE)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in _conversations()))
    out = root / "run"
    run("distill", "--teacher", teacher, "--data", data, "--out", out, "--chat-template", template,
        "--train-on", "assistant", *COMMON)
    run("export", out, "--out", root / "model")
    return root


def test_export_answers_through_its_chat_template_as_the_student_did_in_training(chat_run):
    # Catches an export without the run's --chat-template (the teacher's tokenizer has none), a template
    # rendered differently from training, and generation that does not stop at the end of the assistant turn.
    model_dir = chat_run / "model"
    assert (model_dir / "chat_template.jinja").read_text() == TEMPLATE
    tok = AutoTokenizer.from_pretrained(model_dir)
    trained = build_packed_dataset([chat_run / "chat.jsonl"], AutoTokenizer.from_pretrained(chat_run / "teacher"),
                                   64, chat_template=str(chat_run / "chat.jinja"), train_on="assistant")
    first = _conversations()[0]
    ids = tok.apply_chat_template(first, tokenize=True, return_dict=False)
    end = int(trained.doc_starts[1]) if len(trained.doc_starts) > 1 else len(trained.tokens)
    assert list(ids) + [tok.eos_token_id] == trained.tokens[:end].tolist()

    exported = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _, method, _, _ = load_run(chat_run / "run")
    with torch.no_grad():
        want = method.student_model().eval()(torch.tensor([ids])).logits
        got = exported(torch.tensor([ids])).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in exported.generation_config.eos_token_id


def test_eval_of_the_export_is_the_training_held_out_loss_on_assistant_tokens(chat_run):
    # `lrc eval` of the export uses the stored template and the run's --train-on by default: the same loss as
    # the training loop's held-out evaluation of the student on the same sequences (assistant tokens only).
    data = build_packed_dataset([chat_run / "chat.jsonl"], AutoTokenizer.from_pretrained(chat_run / "teacher"), 64,
                                chat_template=str(chat_run / "chat.jinja"), train_on="assistant")
    _, method, _, _ = load_run(chat_run / "run")
    training = heldout_loss(method, data, batch_size=4, device="cpu", precision="fp32")
    model = AutoModelForCausalLM.from_pretrained(chat_run / "model", dtype=torch.float32)
    assert model_loss(model, data, precision="fp32")["loss"] == pytest.approx(training["loss"], rel=1e-6)
    exported, = evaluate_models([str(chat_run / "model")], [str(chat_run / "chat.jsonl")], seq_len=64)
    assert exported["targets"] == "assistant"
    assert exported["tokens"] == training["labels"] < len(data) * 64
    assert exported["loss"] == pytest.approx(training["loss"], rel=1e-3)  # precision auto: bf16 where fast
    every, = evaluate_models([str(chat_run / "model")], [str(chat_run / "chat.jsonl")], seq_len=64, train_on="all")
    assert every["tokens"] > exported["tokens"]


def test_export_writes_a_model_card_and_the_teachers_licence_files(chat_run):
    model_dir = chat_run / "model"
    text = (model_dir / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "someone/tiny-teacher"
    assert {"lowrankclone", "lrc", "chat"} <= set(meta["tags"])
    for fact in ("2 steps", "hidden 32 of 64", "--train-on assistant", "held-out loss", "the template"):
        assert fact in text
    assert (model_dir / "LICENSE").read_text() == "the teacher's licence\n"
    assert (model_dir / "NOTICE").read_text() == "the teacher's notice\n"
    assert yaml.safe_load((model_dir / "lrc-config.yaml").read_text())["train_on"] == "assistant"


def test_any_kept_checkpoint_exports_and_runs_lists_them(chat_run, capsys, tmp_path):
    run_dir = chat_run / "run"
    capsys.readouterr()
    assert main(["runs", str(run_dir), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in listing["checkpoints"]] == [1, 2]
    assert all(c["loss"] is not None for c in listing["checkpoints"]) and listing["teacher_loss"] is not None

    run("export", run_dir, "--step", 1, "--out", tmp_path / "step1")
    first, last = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in
                   (tmp_path / "step1", chat_run / "model"))
    assert not torch.equal(first.model.embed_tokens.weight, last.model.embed_tokens.weight)
    assert "1 step" in (tmp_path / "step1" / "README.md").read_text()
    one, = evaluate_models([str(tmp_path / "step1")], [str(chat_run / "chat.jsonl")], seq_len=64)
    assert one["loss"] != pytest.approx(listing["checkpoints"][1]["loss"], rel=1e-6)

    run("export", run_dir, "--checkpoint", listing["checkpoints"][0]["path"], "--out", tmp_path / "by-path")
    by_path = AutoModelForCausalLM.from_pretrained(tmp_path / "by-path", dtype=torch.float32)
    assert torch.equal(by_path.model.embed_tokens.weight, first.model.embed_tokens.weight)

    assert main(["export", str(run_dir), "--step", "7", "--out", str(tmp_path / "nope")]) == 2
    assert "keeps no checkpoint of step 7; it keeps steps 1, 2" in capsys.readouterr().err


def test_eval_side_by_side_scores_every_model_on_the_same_tokens(chat_run):
    # The teacher (no lrc run of its own) is scored on the export's run's targets, not on all tokens.
    teacher, student = evaluate_models([str(chat_run / "teacher"), str(chat_run / "model")],
                                       [str(chat_run / "chat.jsonl")], seq_len=64,
                                       chat_template=str(chat_run / "chat.jinja"))
    assert teacher["targets"] == student["targets"] == "assistant" and teacher["tokens"] == student["tokens"]
    from lrc.eval.table import format_text

    assert format_text([teacher, student]).splitlines()[0].split()[:4] == ["model", "parameters", "loss", "(assistant)"]


def test_a_hub_teachers_card_and_licence_files_are_fetched_and_offline_is_no_error(tmp_path, monkeypatch):
    # A hub teacher's LICENSE/USE_POLICY are not fetched by loading the model: the export asks for them.
    import huggingface_hub

    from lrc.publish.card import copy_licence_files, teacher_folder, teacher_front_matter

    hub = tmp_path / "snapshot"
    hub.mkdir()
    (hub / "README.md").write_text("---\nlicense: llama3.2\n---\n")
    (hub / "LICENSE.txt").write_text("licence")
    (hub / "USE_POLICY.md").write_text("policy")
    asked = {}

    def fetch(repo_id, allow_patterns):
        asked.update(repo=repo_id, patterns=allow_patterns)
        return str(hub)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    folder = teacher_folder("meta-llama/Llama-3.2-3B")
    assert folder == hub and asked["repo"] == "meta-llama/Llama-3.2-3B" and "LICENSE*" in asked["patterns"]
    assert teacher_front_matter(folder)["license"] == "llama3.2"
    (tmp_path / "out").mkdir()
    assert copy_licence_files(folder, tmp_path / "out") == ["LICENSE.txt", "USE_POLICY.md"]

    def offline(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert teacher_folder("meta-llama/Llama-3.2-3B") is None and teacher_front_matter(None) == {}
