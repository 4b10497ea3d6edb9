"""The data pipeline on `datasets`: parallel tokenisation and its cache, chat rows and assistant-only targets,
weighted mixtures, streaming with exact resume, `lrc prepare`, and tokenising once per machine under torchrun."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import corpus, records, run, save_teacher, write_data, write_jsonl

from lrc.cli import main
from lrc.data import (
    Mixture,
    MixtureSampler,
    PackedDataset,
    build_packed_dataset,
    build_training_data,
    make_batches,
)
from lrc.data.batch import IGNORE_INDEX
from lrc.data.tokenizer import train_bpe
from lrc.errors import UserError
from lrc.model.losses import kl_positions

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [
    [{"role": "system", "content": "speak like a king"}, {"role": "user", "content": "the castle at night"},
     {"role": "assistant", "content": "the queen and the crown"}, {"role": "user", "content": "the river"},
     {"role": "assistant", "content": "gold field wind rose"}],
    [{"role": "user", "content": "love death honour"}, {"role": "assistant", "content": "the ghost of the storm"}],
]


def _sharegpt(chat):
    return [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in chat]


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe(corpus(), vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ------------------------------------------------------------------------------------ parallel + cache


def _map_cache_files(before: tuple = ()) -> list[Path]:  # those not in `before` (other tests share the cache)
    import datasets

    return sorted(set(Path(datasets.config.HF_DATASETS_CACHE).rglob("cache-*.arrow")) - set(before))


def test_num_proc_gives_the_same_stream_and_ids_are_stored_once(tmp_path, tokenizer, monkeypatch):
    # Catches shards packed out of order or dropped by the multi-process map; datasets' Arrow copy of the ids
    # left beside the store (each id would be on disk twice); and an interrupted build whose map result is not
    # kept until the store is complete (the next try would tokenise again).
    import lrc.data.packed as packed

    data = write_data(tmp_path / "d", "jsonl", n_docs=60)
    before = tuple(_map_cache_files())
    one = build_packed_dataset([data], tokenizer, 16, batch_size=4)
    assert _map_cache_files(before) == []
    with monkeypatch.context() as patch:
        patch.setattr(packed, "_narrow", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            build_packed_dataset([data], tokenizer, 16, tmp_path / "cache-a", batch_size=4, num_proc=2)
    assert _map_cache_files(before) and not (tmp_path / "cache-a").exists()
    with monkeypatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenised again"))
        two = build_packed_dataset([data], tokenizer, 16, tmp_path / "cache-a", batch_size=4, num_proc=2)
    np.testing.assert_array_equal(one.tokens, two.tokens)
    np.testing.assert_array_equal(one.doc_starts, two.doc_starts)
    assert two.tokens.dtype == np.uint16 and _map_cache_files(before) == []


# ------------------------------------------------------------------------------------------------ chat


def test_chat_rows_use_the_template_in_both_layouts(tmp_path, tokenizer):
    # Catches chat rows read as text, ShareGPT's from/value not mapped, and a missing or doubled EOS.
    a = write_jsonl(tmp_path / "messages.jsonl", [{"messages": c} for c in CHATS])
    b = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": _sharegpt(c)} for c in CHATS])
    eos = tokenizer.eos_token_id
    want = [list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) + [eos] for c in CHATS]
    for path in (a, b):
        ds = build_packed_dataset([path], tokenizer, 8)
        docs = np.split(np.asarray(ds.tokens), ds.doc_starts[1:])
        assert [d.tolist() for d in docs] == want
        assert ds.loss_mask is None  # --train-on all: every token is a target


def test_train_on_assistant_counts_only_the_assistants_tokens(tmp_path, tokenizer):
    # Catches user/system tokens or role headers left as targets, and assistant tokens masked out.
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    ds = build_packed_dataset([path], tokenizer, 8, train_on="assistant")
    targets = np.asarray(ds.tokens)[np.asarray(ds.loss_mask, dtype=bool)]
    # Each answer with its end-of-turn marker, and the EOS after a conversation's last answer.
    answers = "".join("".join(f"{m['content']}<|im_end|>\n" for m in c if m["role"] == "assistant")
                      + tokenizer.eos_token for c in CHATS)
    assert tokenizer.decode(targets.tolist()) == answers
    # Labels and the KL's mask: position j counts exactly when token j+1 is a target (and lies in the sequence).
    mask = np.asarray(ds.loss_mask)
    for i in range(len(ds)):
        item = ds.get(i)
        want = torch.tensor([bool(mask[i * ds.seq_len + j + 1]) for j in range(ds.seq_len - 1)] + [False])
        assert torch.equal(item["loss_mask"], want)
        assert (item["labels"][~want] == IGNORE_INDEX).all()
        assert torch.equal(kl_positions(item["labels"], None, item["loss_mask"]), want)


def test_distill_on_chat_data_with_assistant_targets(tmp_path, teacher, monkeypatch):
    # The CLI path: --chat-template for a tokenizer without one, --train-on assistant through the trainer,
    # a mixture of chat (masked) and plain text (unmasked) sources in the same batches.
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc-cache"))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS * 10])
    template = tmp_path / "t.jinja"
    template.write_text(CHAT_TEMPLATE)
    text = write_data(tmp_path / "d", "jsonl")
    run("distill", "--teacher", teacher, "--data", f"{chat}:1", f"{text}:1", "--out", tmp_path / "run",
        "--chat-template", template, "--train-on", "assistant", "--max-steps", "2", *COMMON)
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2]


def test_text_beside_chat_rows_counts_every_token(tmp_path, tokenizer):
    # One source of chat rows and plain text files under --train-on assistant: the text is all targets.
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "a.jsonl", [{"messages": c} for c in CHATS])
    (tmp_path / "src" / "b.txt").write_text("the king and the queen")
    ds = build_packed_dataset([tmp_path / "src"], tokenizer, 8, train_on="assistant")
    text = np.asarray(ds.loss_mask)[ds.doc_starts[-1]:]
    assert len(ds.doc_starts) == 3 and text.all() and not np.asarray(ds.loss_mask).all()


def test_chat_without_a_template_is_a_user_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    plain = train_bpe(corpus(), vocab_size=300)
    with pytest.raises(UserError, match="has no chat template; pass --chat-template FILE"):
        build_packed_dataset([path], plain, 8)
    template = tmp_path / "t.jinja"
    template.write_text(CHAT_TEMPLATE)
    assert len(build_packed_dataset([path], plain, 8, chat_template=str(template)).tokens) > 0


# --------------------------------------------------------------------------------------------- mixtures


def _mixture(sizes, weights, seq_len=4) -> Mixture:
    parts = [PackedDataset(np.full(n * seq_len, k, np.int32), np.array([0]), seq_len) for k, n in enumerate(sizes)]
    return Mixture(parts, weights, [f"s{k}" for k in range(len(sizes))])


def test_mixture_proportions_determinism_and_resume():
    # Catches sampling by dataset size instead of weight (sizes here are 10:50:200 against weights 6:3:1),
    # a non-deterministic choice, and a resume that does not continue the same stream.
    mix = _mixture([10, 50, 200], [0.6, 0.3, 0.1])
    drawn = [mix.get(i)["input_ids"][0].item() for i in MixtureSampler(mix, seed=1).next_indices(3000)]
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.02, shares
    straight = MixtureSampler(mix, seed=1)
    expected = [straight.next_indices(7) for _ in range(6)]
    assert expected[0] == MixtureSampler(mix, seed=1).next_indices(7)
    first = MixtureSampler(mix, seed=1)
    got = [first.next_indices(7) for _ in range(2)]
    resumed = MixtureSampler(mix, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert got + [resumed.next_indices(7) for _ in range(4)] == expected
    with pytest.raises(UserError, match="other data"):
        MixtureSampler(_mixture([10, 51, 200], [1, 1, 1]), seed=1).load_state_dict(first.state_dict())
    # Two ranks with batch 7 see the global batches of one process with batch 14.
    single = MixtureSampler(mix, seed=3).next_indices(14)
    assert MixtureSampler(mix, 3, 0, 2).next_indices(7) + MixtureSampler(mix, 3, 1, 2).next_indices(7) == single


def test_weighted_data_items_make_a_mixture(tmp_path, tokenizer, caplog):
    a = write_data(tmp_path / "a", "jsonl", n_docs=20, seed=1)
    b = write_data(tmp_path / "b", "txt", n_docs=10, seed=2)
    with caplog.at_level("INFO", logger="lrc"):
        mix = build_training_data([f"{a}:3", f"{b}:1"], tokenizer, 16, tmp_path / "cache")
    assert isinstance(mix, Mixture) and mix.weights == [0.75, 0.25]
    assert "75.0% of the sequences" in caplog.text and "tokens" in caplog.text
    with pytest.raises(UserError, match="give every item a weight"):
        build_training_data([f"{a}:3", str(b)], tokenizer, 16, tmp_path / "cache")
    with pytest.raises(UserError, match="not a positive number"):
        build_training_data([f"{a}:0", f"{b}:1"], tokenizer, 16, tmp_path / "cache")


# -------------------------------------------------------------------------------------------- streaming


def test_stream_equals_the_stored_stream_and_resumes_exactly(tmp_path, tokenizer):
    # Catches a stream that packs differently from the stored path, and a resume that restarts at a document
    # boundary or re-reads from the start instead of continuing at the saved token.
    data = write_data(tmp_path / "d", "jsonl", n_docs=12)
    stored = build_packed_dataset([data], tokenizer, 24)
    n = len(stored)
    straight = make_batches(build_training_data([str(data)], tokenizer, 24, None, streaming=True), seed=0)
    want = [straight.next(3) for _ in range(n // 3 + 4)]  # runs into the second epoch
    for k in range(n // 3):  # the first epoch in file order, like the stored stream unshuffled
        for key in ("input_ids", "position_ids", "labels"):
            assert torch.equal(want[k][key], torch.stack([stored.get(3 * k + j)[key] for j in range(3)])), (k, key)
    for stop in (1, 2, n // 3, n // 3 + 1):  # n // 3: the state may sit at the very end of the first epoch
        first = make_batches(build_training_data([str(data)], tokenizer, 24, None, streaming=True), seed=0)
        got = [first.next(3) for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make_batches(build_training_data([str(data)], tokenizer, 24, None, streaming=True), seed=0)
        resumed.load_state_dict(state)
        got += [resumed.next(3) for _ in range(len(want) - stop)]
        for a, b in zip(got, want, strict=True):
            assert all(torch.equal(a[key], b[key]) for key in a), stop
    # One sequence per epoch: the saved position is the very end of the stream, and a resume goes on to epoch 2.
    whole = len(stored.tokens)
    first = make_batches(build_training_data([str(data)], tokenizer, whole, None, streaming=True), seed=0)
    head = first.next(1)
    resumed = make_batches(build_training_data([str(data)], tokenizer, whole, None, streaming=True), seed=0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert torch.equal(resumed.next(1)["input_ids"], head["input_ids"])


def test_under_torchrun_each_process_streams_and_tokenises_only_its_share(tmp_path, tokenizer, monkeypatch):
    # Catches every process reading and tokenising the whole stream (as before), shares that overlap or miss
    # documents, and held-out documents read again for training.
    from lrc.data.tokenise import Tokenise

    data = write_data(tmp_path / "d", "jsonl", n_docs=30)
    whole = build_training_data([str(data)], tokenizer, 16, None, streaming=True)
    docs = [(index, list(ids)) for _, _, _, index, _, ids, _ in itertools.islice(whole._documents(whole.position), 30)]
    assert [i for i, _ in docs] == list(range(30))
    rows = []
    real = Tokenise.__call__
    monkeypatch.setattr(Tokenise, "__call__", lambda self, batch, indices=None: (
        rows.append(len(next(iter(batch.values())))), real(self, batch, indices))[1])
    got, held = {}, None
    for rank in (0, 1):
        stream = build_training_data([str(data)], tokenizer, 16, None, streaming=True)
        val = stream.head(5, advance=True)  # the held-out sequences: from the whole stream, on every process
        assert held is None or torch.equal(torch.as_tensor(val.tokens), held)
        held = torch.as_tensor(val.tokens)
        skip = stream.position["doc"] + (stream.position["offset"] > 0)
        rows.clear()
        batches = make_batches(stream, seed=0, rank=rank, world_size=2)
        mine = [ids for i, ids in docs if i >= skip and (i - skip) % 2 == rank]
        want = torch.tensor([t for ids in mine for t in ids])
        got[rank] = torch.cat([batches.next(1)["input_ids"].flatten() for _ in range(len(want) // 16)])
        assert torch.equal(got[rank], want[: len(got[rank])]), rank  # its own documents, in order
        assert sum(rows) == len(mine), (rows, len(mine))  # tokenised: its share only (one map batch of it)
    assert 0 < skip < 30


def test_a_stream_split_from_its_start_gives_each_process_its_own_files_and_resumes(tmp_path, tokenizer):
    # With the held-out data elsewhere (--val-data), a source of 2 files under 2 processes is split by files:
    # each process reads only its own file; a copy restored from its position continues at the same token.
    first = write_data(tmp_path / "a", "jsonl", n_docs=12, seed=1)
    second = write_data(tmp_path / "b", "jsonl", n_docs=12, seed=2)
    single = build_training_data([str(first)], tokenizer, 16, None, streaming=True)
    own = torch.tensor([t for _, _, _, _, _, ids, _ in itertools.islice(single._documents(single.position), 12)
                        for t in ids])
    streams = []
    for rank in (0, 1):
        stream = build_training_data([str(first), str(second)], tokenizer, 16, None, streaming=True)
        assert len(stream.raw) == 1 and stream.raw[0].num_shards == 2  # one source of two files
        streams.append(make_batches(stream, seed=0, rank=rank, world_size=2))
    assert streams[0].split_at["strategy"] == "auto"
    got = torch.cat([streams[0].next(1)["input_ids"].flatten() for _ in range(len(own) // 16)])
    assert torch.equal(got, own[: len(got)])  # rank 0: the first file's documents only, in order
    b = streams[1]
    for _ in range(3):
        b.next(2)
    saved = json.loads(json.dumps({"split": b.split_at, "ranks": [None, b.position]}))
    want = b.next(2)
    again = build_training_data([str(first), str(second)], tokenizer, 16, None, streaming=True)
    again.rank, again.world_size = 1, 2
    again.load_state_dict(saved)
    got = again.next(2)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_hub_id_is_streamed_without_known_columns(tokenizer, monkeypatch):
    # A hub stream whose features are unknown until read (a generator): columns are found by reading a row,
    # and the stream resumes exactly. Catches a full download (streaming=True not passed) too.
    import datasets

    texts = corpus(n_docs=12, seed=3)

    def rows():
        yield from ({"text": t, "id": i} for i, t in enumerate(texts))

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        assert streaming, "a streamed hub id must not be downloaded whole"
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    straight = make_batches(build_training_data(["owner/stream"], tokenizer, 16, None, streaming=True), seed=0)
    want = [straight.next(2) for _ in range(6)]
    first = make_batches(build_training_data(["owner/stream"], tokenizer, 16, None, streaming=True), seed=0)
    got = [first.next(2) for _ in range(3)]
    resumed = make_batches(build_training_data(["owner/stream"], tokenizer, 16, None, streaming=True), seed=0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.next(2) for _ in range(3)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, want, strict=True) for k in a)


# ----------------------------------------------------------------------------------------- CLI: prepare


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "llama")


COMMON = ["--method", "lrc",
          "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4", "--precision", "fp32", "--calib-batches",
          "1", "--eval-batches", "1", "--log-every", "1", "--device", "cpu"]


def test_prepare_then_distill_and_a_tokenizer_mismatch(tmp_path, teacher, monkeypatch, capsys):
    # Catches a prepared folder that is tokenised again by distill, or accepted for another tokenizer.
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "lrc-cache"))
    data = write_data(tmp_path / "d", "jsonl")
    run("prepare", "--teacher", teacher, "--data", data, "--out", tmp_path / "tokens", "--num-proc", "2")
    assert "tokens/s" in capsys.readouterr().out
    from transformers import PreTrainedTokenizerFast

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerFast, "__call__", lambda *a, **k: pytest.fail("tokenised again"))
        run("distill", "--teacher", teacher, "--data", tmp_path / "tokens", "--out", tmp_path / "run",
            "--max-steps", "1", *COMMON)
    assert not (tmp_path / "lrc-cache" / "tokens").exists()
    other = tmp_path / "other"
    other.mkdir()
    tok = train_bpe(corpus(seed=5), vocab_size=280)
    tok.save_pretrained(other)
    for f in ("config.json", "model.safetensors"):
        (other / f).write_bytes((teacher / f).read_bytes())
    assert main(["distill", "--teacher", str(other), "--data", str(tmp_path / "tokens"), "--out",
                 str(tmp_path / "run2"), "--max-steps", "1", *COMMON]) == 2
    err = capsys.readouterr().err
    assert "tokenizer differs from the teacher's" in err and "lrc prepare" in err and err.count("\n") == 1
    assert not (tmp_path / "run2").exists()


def test_one_line_errors_of_the_new_options(tmp_path, teacher, capsys):
    data = write_data(tmp_path / "d", "jsonl")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [(["prepare", "--teacher", teacher, "--data", data, "--out", tmp_path / "full"], "is not empty"),
             (["prepare", "--teacher", teacher, "--data", data, "--out", tmp_path / "p", "--num-proc", "0"],
              "--num-proc must be a positive integer"),
             (["distill", "--teacher", teacher, "--data", f"{data}:1", f"{data}:2", "--out", tmp_path / "r",
               "--streaming", "--max-steps", "1", *COMMON], "--streaming reads one source"),
             (["distill", "--teacher", teacher, "--data", f"{data}:1", str(data), "--out", tmp_path / "r",
               "--max-steps", "1", *COMMON], "give every item a weight")]
    for argv, needle in cases:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()


def test_calibration_draws_from_every_source_in_its_share_with_the_seed():
    # Catches calibration on the first sequences of the data (a mixture's first source only) and a draw that
    # ignores the seed or repeats sequences.
    from lrc.data import calibration_order

    mix = _mixture([10, 50, 200], [0.6, 0.3, 0.1])
    drawn = calibration_order(mix, 40, seed=1)
    shares = np.bincount([mix.get(i)["input_ids"][0].item() for i in drawn], minlength=3) / len(drawn)
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() <= 1 / 40 + 1e-9, shares
    assert drawn == calibration_order(mix, 40, seed=1) != calibration_order(mix, 40, seed=2)
    single = PackedDataset(np.arange(400, dtype=np.int32), np.array([0]), 4)  # 100 sequences
    picked = calibration_order(single, 20, seed=0)
    assert len(set(picked)) == 20 and max(picked) >= 20  # across the data, not its first 20 sequences
    assert sorted(calibration_order(single, 500, seed=0)) == list(range(100))  # all, once each
