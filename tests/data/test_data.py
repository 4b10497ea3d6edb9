"""Tests for lrc.data: reading every input format, packing, labels/positions, caching, splitting, sampling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lrc.data import (
    HubDataset,
    PackedDataset,
    SequenceSampler,
    build_packed_dataset,
    collate,
    iter_documents,
    parse_hub_id,
    resolve_data_files,
    split_holdout,
)
from lrc.errors import UserError

DOCS = [
    "the cat sat on the mat",
    "a dog ran in the park today and the sun was warm",
    "hello world",
    "birds fly over the quiet river at dawn",
    "the old man read a book by the fire while snow fell outside",
    "green tea is warm",
]
VOCAB_TEXT = DOCS + ["extra words for the second version of a file"]


def _train_word_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(VOCAB_TEXT, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return tok


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer built offline, with EOS = "<eos>"."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_word_tokenizer(), eos_token="<eos>", unk_token="<unk>"
    )


def _expected_stream(tokenizer, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tokens: list[int] = []
    starts: list[int] = []
    for doc in docs:
        starts.append(len(tokens))
        tokens += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.array(tokens, dtype=np.int32), np.array(starts, dtype=np.int64)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- formats


def _make_inputs(root: Path) -> dict[str, Path]:
    """The same documents in every supported format (plus blank/null documents that must be skipped)."""
    import datasets

    datasets.disable_progress_bars()
    made: dict[str, Path] = {}

    text_dir = root / "text"
    (text_dir / "sub").mkdir(parents=True)
    # Names sort into DOCS order; the nested folder sorts after "doc3.md" and before "doc5.text".
    for i, doc in enumerate(DOCS[:4]):
        (text_dir / f"doc{i}{'.txt' if i % 2 == 0 else '.md'}").write_text(doc, encoding="utf-8")
    (text_dir / "doc4-sub").mkdir()
    (text_dir / "doc4-sub" / "a.txt").write_text(DOCS[4], encoding="utf-8")
    (text_dir / "doc5.text").write_text(DOCS[5], encoding="utf-8")
    (text_dir / "doc6-blank.txt").write_text("  \n\t", encoding="utf-8")
    (text_dir / "notes.csv").write_text("ignored,inside,a,folder", encoding="utf-8")
    (text_dir / ".hidden.txt").write_text("hidden files are not data", encoding="utf-8")
    made["text"] = text_dir

    rows = [{"id": i, "text": doc} for i, doc in enumerate(DOCS)]
    with_blanks = rows[:2] + [{"id": -1, "text": "   "}, {"id": -2, "text": None}] + rows[2:]
    made["jsonl"] = _write_jsonl(root / "data.jsonl", with_blanks)
    (root / "list.json").write_text(json.dumps(with_blanks, indent=2), encoding="utf-8")
    made["json_list"] = root / "list.json"
    made["json_lines"] = _write_jsonl(root / "lines.json", with_blanks)

    table = pa.table({"id": [r["id"] for r in with_blanks], "text": [r["text"] for r in with_blanks]})
    pq.write_table(table, root / "data.parquet", row_group_size=2)  # several row groups / batches
    made["parquet"] = root / "data.parquet"

    dataset = datasets.Dataset.from_dict({"id": [r["id"] for r in rows], "text": DOCS})
    dataset.save_to_disk(str(root / "saved"))
    made["save_to_disk"] = root / "saved"
    other = datasets.Dataset.from_dict({"id": [0], "text": ["not the train split"]})
    datasets.DatasetDict({"validation": other, "train": dataset}).save_to_disk(str(root / "saved_dict"))
    made["save_to_disk_dict"] = root / "saved_dict"
    return made


def test_every_format_gives_the_same_tokens(tmp_path, tokenizer):
    inputs = _make_inputs(tmp_path)
    want_tokens, want_starts = _expected_stream(tokenizer, DOCS)
    for name, path in inputs.items():
        assert list(iter_documents(resolve_data_files([str(path)]))) == DOCS, name
        ds = build_packed_dataset([str(path)], tokenizer, seq_len=8, batch_size=4)
        assert ds.tokens.dtype == np.uint16 and ds.doc_starts.dtype == np.int64, name  # 46 ids: uint16
        np.testing.assert_array_equal(ds.tokens, want_tokens, err_msg=name)
        np.testing.assert_array_equal(ds.doc_starts, want_starts, err_msg=name)
        assert len(ds) == len(want_tokens) // 8


def test_resolve_data_files_order_and_units(tmp_path):
    inputs = _make_inputs(tmp_path)
    files = resolve_data_files([str(inputs["text"])])
    names = [p.relative_to(inputs["text"].resolve()).as_posix() for p in files]
    assert names == [
        "doc0.txt",
        "doc1.md",
        "doc2.txt",
        "doc3.md",
        "doc4-sub/a.txt",
        "doc5.text",
        "doc6-blank.txt",
    ]
    # A folder holding a save_to_disk dataset is one entry, not descended into; duplicates collapse.
    both = resolve_data_files([str(tmp_path), str(inputs["jsonl"])])
    assert inputs["save_to_disk"].resolve() in both and inputs["save_to_disk_dict"].resolve() in both
    assert not any(p.suffix == ".arrow" or p.name == "state.json" for p in both)
    assert len(both) == len(set(both))


# ------------------------------------------------------------------------------- positions and labels


def test_positions_and_labels_on_a_hand_made_stream():
    # Documents: [0..2] (ends with EOS 99), [3..9], [10..11]; tokens are 0..11 except EOS positions.
    tokens = np.arange(12, dtype=np.int32)
    tokens[[2, 9, 11]] = 99
    ds = PackedDataset(tokens=tokens, doc_starts=np.array([0, 3, 10]), seq_len=4)
    assert len(ds) == 3

    first = ds.get(0)
    assert first["input_ids"].tolist() == [0, 1, 99, 3]
    assert first["position_ids"].tolist() == [0, 1, 2, 0]
    # Before EOS the label is EOS; at EOS (next token opens a document) and at the last position: -100.
    assert first["labels"].tolist() == [1, 99, -100, -100]

    middle = ds.get(1)  # starts mid-document: positions continue from the document's real start (3)
    assert middle["input_ids"].tolist() == [4, 5, 6, 7]
    assert middle["position_ids"].tolist() == [1, 2, 3, 4]
    assert middle["labels"].tolist() == [5, 6, 7, -100]

    last = ds.get(2)
    assert last["position_ids"].tolist() == [5, 6, 0, 1]
    assert last["labels"].tolist() == [99, -100, 99, -100]
    for item in (first, middle, last):
        assert all(t.dtype == torch.int64 and t.shape == (4,) for t in item.values())
    with pytest.raises(IndexError):
        ds.get(3)


def test_positions_and_labels_on_a_built_dataset(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    ds = build_packed_dataset([str(path)], tokenizer, seq_len=5)
    eos = tokenizer.eos_token_id
    starts = set(ds.doc_starts.tolist())
    for index in range(len(ds)):
        item = ds.get(index)
        base = index * ds.seq_len
        for i in range(ds.seq_len):
            offset = base + i
            doc_start = max(s for s in starts if s <= offset)
            assert item["position_ids"][i] == offset - doc_start
            if i == ds.seq_len - 1 or (offset + 1) in starts:
                assert item["labels"][i] == -100
            else:
                assert item["labels"][i] == ds.tokens[offset + 1]
            if item["input_ids"][i] == eos:
                assert item["labels"][i] == -100
    # At least one sequence starts mid-document, so the continuation case is exercised.
    assert any(ds.get(i)["position_ids"][0] > 0 for i in range(len(ds)))


def test_collate_stacks():
    ds = PackedDataset(tokens=np.arange(12, dtype=np.int32), doc_starts=np.array([0]), seq_len=4)
    batch = collate([ds.get(0), ds.get(2)])
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids"][1].tolist() == [8, 9, 10, 11]


# ---------------------------------------------------------------------------------------------- caching


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_cache_is_reused_and_keyed_on_inputs(tmp_path, tokenizer, monkeypatch):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    cache = tmp_path / "cache" / "tokens"
    first = build_packed_dataset([str(data)], tokenizer, seq_len=8, cache_dir=cache)
    assert isinstance(first.tokens, np.memmap)
    files = _cache_files(cache)
    assert len(files) == 3 and not any(".tmp-" in f for f in files)  # tokens, starts, manifest

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    with monkeypatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", no_tokenising)
        again = build_packed_dataset([str(data)], tokenizer, seq_len=8, cache_dir=cache)
        # seq_len is not part of the key: the token stream does not depend on it.
        other_len = build_packed_dataset([str(data)], tokenizer, seq_len=4, cache_dir=cache)
    np.testing.assert_array_equal(again.tokens, first.tokens)
    np.testing.assert_array_equal(again.doc_starts, first.doc_starts)
    assert len(other_len) == len(first.tokens) // 4
    assert _cache_files(cache) == files

    # Changing the file (size and mtime) changes the key: a new cache entry, new tokens.
    _write_jsonl(data, [{"text": d} for d in DOCS] + [{"text": VOCAB_TEXT[-1]}])
    changed = build_packed_dataset([str(data)], tokenizer, seq_len=8, cache_dir=cache)
    assert len(changed.tokens) > len(first.tokens)
    assert len(_cache_files(cache)) == 6

    # Same size, new mtime: also a new key (sizes alone would miss an in-place edit).
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    build_packed_dataset([str(data)], tokenizer, seq_len=8, cache_dir=cache)
    assert len(_cache_files(cache)) == 9

    # A different text field is a different key too.
    _write_jsonl(data, [{"text": d, "body": d} for d in DOCS])
    build_packed_dataset([str(data)], tokenizer, seq_len=8, cache_dir=cache, text_field="body")
    assert len(_cache_files(cache)) == 12


def test_interrupted_build_leaves_no_cache(tmp_path, tokenizer, monkeypatch):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    cache = tmp_path / "new" / "cache"
    real_call = type(tokenizer).__call__
    calls = []

    def fail_on_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_call(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", fail_on_third_batch)
        with pytest.raises(KeyboardInterrupt):
            build_packed_dataset([str(data)], tokenizer, seq_len=8, cache_dir=cache, batch_size=1)
    assert not (tmp_path / "new").exists()  # not even the folders it created

    # Too little data is found only after tokenising (datasets reads a row without the field as null, so a
    # missing field is no longer a late error): the UserError comes after tokenising, yet nothing is left.
    cache.parent.mkdir()
    _write_jsonl(data, [{"text": DOCS[2]}, {"body": "no text field"}])
    with pytest.raises(UserError, match="fewer than one training sequence"):
        build_packed_dataset([str(data)], tokenizer, seq_len=8, cache_dir=cache, batch_size=1)
    assert _cache_files(cache.parent) == []


# ------------------------------------------------------------------------------------------ user errors


def _user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_user_errors_for_paths(tmp_path, tokenizer):
    missing = tmp_path / "nope.jsonl"
    assert "does not exist" in _user_error(resolve_data_files, [str(missing)])
    assert str(missing) in _user_error(build_packed_dataset, [str(missing)], tokenizer, 8)

    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n", encoding="utf-8")
    message = _user_error(resolve_data_files, [str(csv)])
    assert "unsupported format '.csv'" in message and ".jsonl" in message and "save_to_disk" in message

    empty_dir = tmp_path / "only-csv"
    empty_dir.mkdir()
    (empty_dir / "x.csv").write_text("a", encoding="utf-8")
    assert "no usable data files" in _user_error(resolve_data_files, [str(empty_dir)])
    assert "no data paths" in _user_error(resolve_data_files, [])


def test_user_errors_for_missing_text_field(tmp_path, tokenizer):
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [{"title": "t", "body": "b"}])
    message = _user_error(build_packed_dataset, [str(jsonl)], tokenizer, 8)
    assert "has no field 'text'; pass --text-field NAME (fields: title, body)" in message
    # With the right field it works.
    assert list(iter_documents([jsonl], text_field="body")) == ["b"]

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    assert "(fields: body)" in _user_error(list, iter_documents([tmp_path / "d.parquet"]))

    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    assert "(fields: content)" in _user_error(list, iter_documents([tmp_path / "saved"]))

    not_text = _write_jsonl(tmp_path / "n.jsonl", [{"text": 3}])
    assert "not text" in _user_error(list, iter_documents([not_text]))
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    assert "line 2 is not valid JSON" in _user_error(list, iter_documents([broken]))


def test_user_errors_for_too_little_data(tmp_path, tokenizer):
    blank = _write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    assert "no text found in" in _user_error(build_packed_dataset, [str(blank)], tokenizer, 8)

    short = tmp_path / "short.txt"
    short.write_text("hello world", encoding="utf-8")  # 2 words + EOS = 3 tokens
    message = _user_error(build_packed_dataset, [str(short)], tokenizer, 8, cache_dir=tmp_path / "cache")
    assert "has 3 tokens, fewer than one training sequence of 8; add data or lower --seq-len" in message
    assert not (tmp_path / "cache").exists()

    assert "--seq-len" in _user_error(build_packed_dataset, [str(short)], tokenizer, 0)


def test_user_error_for_tokenizer_without_eos(tmp_path):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=_train_word_tokenizer(), unk_token="<unk>")
    data = tmp_path / "d.txt"
    data.write_text(DOCS[1], encoding="utf-8")
    assert "no EOS token" in _user_error(
        build_packed_dataset, [str(data)], no_eos, 4, cache_dir=tmp_path / "c"
    )
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------------------- hub datasets


def test_parse_hub_id():
    assert parse_hub_id("wikitext") == HubDataset("wikitext", None, "train")
    assert parse_hub_id("roneneldan/TinyStories") == HubDataset("roneneldan/TinyStories", None, "train")
    assert parse_hub_id("wikitext:wikitext-103-raw-v1") == HubDataset("wikitext", "wikitext-103-raw-v1", "train")
    assert parse_hub_id("owner/name@validation") == HubDataset("owner/name", None, "validation")
    full = parse_hub_id("owner/name-1.0:en@train[:10%]")
    assert full == HubDataset("owner/name-1.0", "en", "train[:10%]")
    assert str(full) == "owner/name-1.0:en@train[:10%]" and parse_hub_id(str(full)) == full
    assert str(parse_hub_id("wikitext")) == "wikitext@train"
    # Paths, and names that look like data files, are not hub ids.
    for text in ("corpus.jsonl", "data/train.parquet", "./corpus", "/abs/corpus", "~/corpus", "a/b/c", "a b", ""):
        assert parse_hub_id(text) is None, text


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """Offline mode with an empty datasets cache: a hub id can only fail, and nothing touches the network."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read these variables once, at import: set what they read too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def test_unavailable_hub_dataset_is_a_user_error(hub_offline, tmp_path, tokenizer, monkeypatch):
    name = "lrc-test/no-such-dataset:cfg@validation"
    message = _user_error(resolve_data_files, [name])
    assert message.startswith(f"cannot load hub dataset {name}: ")
    assert message.endswith(
        f"; check the name, go online, or pass existing local files (there is no local path {name} either)"
    )
    # The same error comes from a build, before a cache folder is made.
    cache = tmp_path / "cache"
    assert "cannot load hub dataset wikitext@train" in _user_error(
        build_packed_dataset, ["wikitext"], tokenizer, 8, cache_dir=cache
    )
    assert not cache.exists()
    # A missing local file keeps its own error, also when given as a relative name.
    monkeypatch.chdir(tmp_path)
    assert "data path corpus.jsonl does not exist" in _user_error(resolve_data_files, ["corpus.jsonl"])


def test_hub_dataset_is_read_and_cached(tmp_path, tokenizer, monkeypatch):
    import datasets

    calls = []
    rows = {"id": [0, 1, -1, 2, 3, 4, 5], "text": DOCS[:2] + ["  "] + DOCS[2:]}

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sources = resolve_data_files(["owner/tiny:en"])
    assert sources == [HubDataset("owner/tiny", "en", "train")] and calls == [("owner/tiny", "en", "train")]
    assert list(iter_documents(sources)) == DOCS
    assert build_packed_dataset(sources, tokenizer, seq_len=8).tokens.size and len(calls) == 1  # not reloaded

    cache = tmp_path / "cache"
    first = build_packed_dataset(["owner/tiny:en"], tokenizer, seq_len=8, cache_dir=cache)
    want_tokens, want_starts = _expected_stream(tokenizer, DOCS)
    np.testing.assert_array_equal(first.tokens, want_tokens)
    np.testing.assert_array_equal(first.doc_starts, want_starts)
    files = _cache_files(cache)
    assert len(files) == 3

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    with monkeypatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", no_tokenising)
        again = build_packed_dataset(["owner/tiny:en@train"], tokenizer, seq_len=8, cache_dir=cache)
    np.testing.assert_array_equal(again.tokens, first.tokens)
    assert _cache_files(cache) == files

    # New content (a new fingerprint) or another split is a new cache entry.
    rows["text"] = DOCS[::-1] + [VOCAB_TEXT[-1]]
    build_packed_dataset(["owner/tiny:en"], tokenizer, seq_len=8, cache_dir=cache)
    assert len(_cache_files(cache)) == 6
    build_packed_dataset(["owner/tiny:en@validation"], tokenizer, seq_len=8, cache_dir=cache)
    assert len(_cache_files(cache)) == 9

    message = _user_error(build_packed_dataset, ["owner/tiny"], tokenizer, 8, text_field="body")
    assert "hub dataset owner/tiny@train has no field 'body'; pass --text-field NAME (fields: id, text)" in message


# ----------------------------------------------------------------------------------------------- holdout


def test_split_holdout_sizes_and_content(tmp_path, tokenizer):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    ds = build_packed_dataset([str(data)], tokenizer, seq_len=5, cache_dir=tmp_path / "cache")
    n = len(ds)
    assert n >= 6
    for fraction, want in ((0.25, -(-n // 4)), (1e-6, 1), (0.999, n - 1)):
        train, hold = split_holdout(ds, fraction)
        assert (len(train), len(hold)) == (n - want, want)
        assert np.shares_memory(train.tokens, ds.tokens) and np.shares_memory(hold.tokens, ds.tokens)
        for i in range(len(train)):
            for key, value in train.get(i).items():
                assert torch.equal(value, ds.get(i)[key])
        for i in range(len(hold)):  # positions continue across the cut, labels stay the same
            for key, value in hold.get(i).items():
                assert torch.equal(value, ds.get(len(train) + i)[key]), (fraction, i, key)
    # Float noise must not add a sequence: 0.7 * 10 is 7.000000000000001.
    ten = PackedDataset(tokens=np.zeros(20, dtype=np.int32), doc_starts=np.array([0]), seq_len=2)
    assert len(split_holdout(ten, 0.7)[1]) == 7
    assert len(split_holdout(ten, 0.0)[1]) == 0

    one = PackedDataset(tokens=np.zeros(7, dtype=np.int32), doc_starts=np.array([0]), seq_len=4)
    assert "too few to hold out" in _user_error(split_holdout, one, 0.1)
    assert "[0, 1)" in _user_error(split_holdout, ds, 1.0)


# ----------------------------------------------------------------------------------------------- sampler


def _draw(sampler: SequenceSampler, n: int, times: int) -> list[list[int]]:
    return [sampler.next_indices(n) for _ in range(times)]


def test_sampler_is_deterministic_and_covers_each_epoch():
    a = _draw(SequenceSampler(10, seed=3), 5, 6)
    b = _draw(SequenceSampler(10, seed=3), 5, 6)
    assert a == b
    assert a != _draw(SequenceSampler(10, seed=4), 5, 6)
    for epoch in range(3):  # two batches of 5 per epoch of 10
        assert sorted(a[2 * epoch] + a[2 * epoch + 1]) == list(range(10))
    assert a[:2] != a[2:4]  # epochs are reshuffled
    assert _draw(SequenceSampler(4, seed=0, shuffle=False), 3, 2) == [[0, 1, 2], [3, 0, 1]]
    # The order is numpy.random.default_rng((seed, epoch)).permutation.
    assert a[0] + a[1] == np.random.default_rng((3, 0)).permutation(10).tolist()


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_resumes_exactly(world_size):
    for rank in range(world_size):
        for stop_after in (1, 2, 3):  # 3 batches of 3 * world cross the boundary of a 7-sequence epoch
            straight = SequenceSampler(7, seed=11, rank=rank, world_size=world_size)
            interrupted = SequenceSampler(7, seed=11, rank=rank, world_size=world_size)
            expected = _draw(straight, 3, stop_after + 4)
            got = _draw(interrupted, 3, stop_after)
            state = json.loads(json.dumps(interrupted.state_dict()))
            assert all(type(v) in (int, bool) for v in state.values())
            resumed = SequenceSampler(7, seed=11, rank=rank, world_size=world_size)
            resumed.load_state_dict(state)
            assert got + _draw(resumed, 3, 4) == expected


def test_sampler_resume_rejects_other_data():
    state = SequenceSampler(10, seed=1).state_dict()
    assert "num_sequences" in _user_error(SequenceSampler(12, seed=1).load_state_dict, state)
    assert "seed" in _user_error(SequenceSampler(10, seed=2).load_state_dict, state)


def test_sampler_global_batch_equivalence():
    b, world, steps = 3, 2, 7  # 7 global batches of 6 over 10 sequences: crosses several epochs
    single = _draw(SequenceSampler(10, seed=5), b * world, steps)
    ranks = [_draw(SequenceSampler(10, seed=5, rank=r, world_size=world), b, steps) for r in range(world)]
    for k in range(steps):
        for r in range(world):
            assert ranks[r][k] == single[k][r * b : (r + 1) * b]
