"""Token stores trust nothing on disk: a prepared folder or cache entry records what it was made with and each
file's size and SHA-256; a prepared folder that disagrees with the teacher's tokenizer or whose files were cut
short, changed or removed is refused with one line (exit 2); a damaged cache entry is tokenised again; ids are
stored in the narrowest dtype; `lrc prepare` run again finishes what a killed one left."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import corpus, save_teacher, write_data
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lrc.cli import main
from lrc.data import build_packed_dataset, prepare_tokens
from lrc.data.packed import token_dtype
from lrc.errors import UserError

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _backend(with_bos: bool, extra: int = 0) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.add_tokens([f"<extra{i}>" for i in range(extra)])
    return tok


def _tokenizer(with_bos: bool = True, extra: int = 0) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=_backend(with_bos, extra), bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer()


@pytest.fixture
def prepared(tmp_path, tokenizer) -> Path:
    out = tmp_path / "tokens"
    prepare_tokens([write_data(tmp_path / "d", "jsonl")], tokenizer, out, seq_len=16, progress=False)
    return out


def _refusal(folder: Path, tokenizer, seq_len: int = 16) -> str:
    with pytest.raises(UserError) as info:
        build_packed_dataset([str(folder)], tokenizer, seq_len)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message, message
    return message


def test_manifest_records_the_recipe_and_the_ids_fit_uint16(prepared, tokenizer):
    manifest = json.loads((prepared / "lrc-tokens.json").read_text())
    assert manifest["vocab_size"] == len(tokenizer) and manifest["dtype"] == "uint16"
    assert manifest["framing"] == {"prefix": [tokenizer.convert_tokens_to_ids(BOS)],
                                   "suffix": [tokenizer.eos_token_id]}
    assert manifest["seq_len"] == 16 and manifest["tokenizer"]["backend_sha256"]
    assert sorted(manifest["files"]) == ["tokens.doc_starts.npy", "tokens.uint16.bin"]
    for name, entry in manifest["files"].items():
        assert (prepared / name).stat().st_size == entry["bytes"] and len(entry["sha256"]) == 64
    ds = build_packed_dataset([str(prepared)], tokenizer, 16)
    assert ds.tokens.dtype == np.uint16 and len(ds.tokens) == manifest["tokens"]
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


def test_damaged_files_are_refused(prepared, tokenizer):
    tokens = prepared / "tokens.uint16.bin"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-64])  # cut short, still a whole number of ids
    assert "is damaged: tokens.uint16.bin has" in _refusal(prepared, tokenizer)
    tokens.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit, same size
    assert "does not match its checksum" in _refusal(prepared, tokenizer)
    tokens.write_bytes(data)
    build_packed_dataset([str(prepared)], tokenizer, 16)  # restored: accepted again
    (prepared / "tokens.doc_starts.npy").unlink()
    assert "tokens.doc_starts.npy is missing" in _refusal(prepared, tokenizer)
    (prepared / "lrc-tokens.json").write_text('{"format": "lrc-packed-tok')  # torn
    assert "is damaged (lrc-tokens.json is unreadable" in _refusal(prepared, tokenizer)


def test_other_tokenizers_are_refused(prepared):
    assert "in its vocabulary size (" in _refusal(prepared, _tokenizer(extra=3))
    assert "in its document framing (BOS/EOS" in _refusal(prepared, _tokenizer(with_bos=False))


def test_a_folder_of_the_old_format_is_refused(prepared, tokenizer):
    marker = prepared / "lrc-tokens.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": "lrc-packed-tokens-v3"}))
    message = _refusal(prepared, tokenizer)
    assert "written by an older lrc (format lrc-packed-tokens-v3" in message and "lrc prepare" in message


def test_a_damaged_cache_entry_is_tokenised_again(tmp_path, tokenizer, caplog):
    data = [str(write_data(tmp_path / "d", "jsonl"))]
    first = np.array(build_packed_dataset(data, tokenizer, 16, tmp_path / "cache").tokens)
    (bin_file,) = (tmp_path / "cache").glob("*.uint16.bin")
    bin_file.write_bytes(bin_file.read_bytes()[:-2])
    again = build_packed_dataset(data, tokenizer, 16, tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(again.tokens), first)
    assert "is damaged" in caplog.text and "tokenising again" in caplog.text


def test_prepare_again_finishes_a_killed_one_and_keeps_a_finished_one(tmp_path, tokenizer, prepared):
    data = [write_data(tmp_path / "d", "jsonl")]
    want = np.array(build_packed_dataset([str(prepared)], tokenizer, 16).tokens)
    # What a kill leaves: files written, no manifest yet (it is written last).
    (prepared / "lrc-tokens.json").unlink()
    (prepared / "tokens.uint16.bin.tmp-123-abcd").write_bytes(b"\0" * 10)
    assert "an `lrc prepare` that did not finish" in _refusal(prepared, tokenizer)
    prepare_tokens(data, tokenizer, prepared, seq_len=16, progress=False)
    assert sorted(p.name for p in prepared.iterdir()) == ["lrc-tokens.json", "tokens.doc_starts.npy",
                                                          "tokens.uint16.bin"]
    np.testing.assert_array_equal(build_packed_dataset([str(prepared)], tokenizer, 16).tokens, want)
    prepare_tokens(data, tokenizer, prepared, seq_len=16, progress=False)  # finished: kept as it is
    with pytest.raises(UserError, match="already holds tokens prepared from other data"):
        prepare_tokens([write_data(tmp_path / "e", "jsonl", seed=3)], tokenizer, prepared, seq_len=16)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not lrc's")
    with pytest.raises(UserError, match="exists and is not empty"):
        prepare_tokens(data, tokenizer, tmp_path / "mine", seq_len=16)


def test_distill_refuses_a_truncated_prepared_folder(tmp_path, capsys, monkeypatch):
    # The case: a prepared folder whose token file was cut short used to be trained on (exit 0).
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    teacher = save_teacher(tmp_path / "teacher")
    data = write_data(tmp_path / "d", "jsonl")
    assert main(["prepare", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "p"),
                 "--seq-len", "32"]) == 0
    tokens = next((tmp_path / "p").glob("tokens.*.bin"))
    tokens.write_bytes(tokens.read_bytes()[:-200])
    capsys.readouterr()
    assert main(["distill", "--teacher", str(teacher), "--data", str(tmp_path / "p"), "--out", str(tmp_path / "r"),
                 "--hidden-size", "32", "--seq-len", "32", "--max-steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged" in err and "cut short" in err, err
    assert not (tmp_path / "r").exists()
