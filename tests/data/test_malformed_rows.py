"""Malformed rows in every supported format (txt/md, jsonl, json, parquet; chat `messages` and ShareGPT
`conversations`): wrong types, missing fields, empty conversations, roles out of order, invalid UTF-8. Each
ends in one line naming the file and the row (exit 2 from the CLI), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import corpus

from lrc.cli import main
from lrc.data import build_packed_dataset, build_training_data
from lrc.data.tokenizer import train_bpe
from lrc.errors import UserError

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = "the king queen castle night sword river crown " * 3
CHAT = {"messages": [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "the queen"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "the king"}, {"from": "gpt", "value": "the queen"}]}


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe(corpus(), vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    return tok


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _turns(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# (name, rows after a good first row, the words the message must hold after "FILE line 2")
JSONL_CASES = [
    ("text-int", [{"text": 5}], "its text is an int, not a string"),
    ("text-list", [{"text": ["a", "b"]}], "its text is a list, not a string"),
    ("messages-str", [{"messages": "hello"}], "its conversation is a str, not a list of turns"),
    ("messages-empty", [{"messages": []}], "its conversation is empty (no turns)"),
    ("messages-null", [{"other": 1}], "its conversation is a NoneType, not a list of turns"),
    ("turn-str", [{"messages": ["hi", "there"]}], "turn 1 is a str, not an object with role and content"),
    ("turn-no-role", [{"messages": [{"content": "hi"}]}], "turn 1 has no 'role' (keys: content)"),
    ("turn-no-content", [{"messages": [{"role": "user"}]}], "turn 1 has no 'content' (keys: role)"),
    ("content-int", [{"messages": [{"role": "user", "content": 5}]}], "turn 1's 'content' is an int, not text"),
    ("role-unknown", [_turns(("wizard", "a"))], "turn 1 has role 'wizard'; roles are system, user, assistant, tool"),
    ("assistant-first", [_turns(("assistant", "a"), ("user", "b"))],
     "roles are out of order: turn 1 is an assistant turn first (expected system or user)"),
    ("system-late", [_turns(("user", "a"), ("assistant", "b"), ("system", "c"))],
     "turn 3 is a system turn after an assistant turn (expected tool or user)"),
    ("two-users", [_turns(("user", "a"), ("user", "b"))], "turn 2 is a user turn after a user turn"),
    ("sharegpt-empty", [{"conversations": []}], "its conversation is empty (no turns)"),
    ("sharegpt-no-value", [{"conversations": [{"from": "human"}]}], "turn 1 has no 'value' (keys: from)"),
    ("sharegpt-role", [{"conversations": [{"from": "bing", "value": "x"}]}], "turn 1 has role 'bing'"),
    ("sharegpt-order", [{"conversations": [{"from": "gpt", "value": "x"}]}], "turn 1 is an assistant turn first"),
    ("not-json", ["{not json"], "is not valid JSON"),
    ("not-an-object", ["[1, 2]"], "is a JSON list, not an object"),
]


def _first_row(name: str) -> dict:
    return SHAREGPT if name.startswith("sharegpt") else CHAT if "text" not in name else {"text": TEXT}


def _message(paths, tokenizer, **options) -> str:
    with pytest.raises(UserError) as info:
        build_packed_dataset([str(p) for p in paths], tokenizer, 8, **options)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("name,rows,words", JSONL_CASES, ids=[c[0] for c in JSONL_CASES])
def test_jsonl_rows(tmp_path, tokenizer, name, rows, words):
    path = _jsonl(tmp_path / f"{name}.jsonl", [_first_row(name), *rows])
    message = _message([path], tokenizer)
    assert f"{path} line 2" in message and words in message, message


@pytest.mark.parametrize("layout", ["messages", "sharegpt"])
def test_json_list_and_parquet_rows(tmp_path, tokenizer, layout):
    good = CHAT if layout == "messages" else SHAREGPT
    column = next(iter(good))
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps([good, good, {column: "a string"}]))
    assert f"{listed} item 2: its conversation is a str" in _message([listed], tokenizer)
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({column: [json.dumps(good), "x"]}), table)  # a text column where turns belong
    assert f"{table} row 0: its conversation is a str, not a list of turns" in _message([table], tokenizer)
    pq.write_table(pa.table({column: [good[column], []]}), table)
    assert f"{table} row 1: its conversation is empty" in _message([table], tokenizer)


def test_a_row_in_the_second_file_and_under_num_proc(tmp_path, tokenizer):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": TEXT}] * 3)
    b = _jsonl(tmp_path / "b.jsonl", [{"text": TEXT}, "", {"text": TEXT}, {"text": 7}])  # a blank line too
    assert f"{b} line 4: its text is an int" in _message([a, b], tokenizer)
    many = _jsonl(tmp_path / "many.jsonl", [{"text": TEXT}] * 40 + [{"text": 7}])
    assert f"{many} line 41: its text is an int" in _message([many], tokenizer, num_proc=2, batch_size=4)


def test_invalid_utf8(tmp_path, tokenizer):
    text = tmp_path / "doc.txt"
    text.write_bytes(b"the king \xff\xfe queen " * 4)
    assert f"cannot read {text} (not UTF-8 text (invalid start byte))" in _message([text], tokenizer)
    lines = tmp_path / "rows.jsonl"
    lines.write_bytes(json.dumps({"text": TEXT}).encode() + b"\n" + b'{"text": "ab\xff"}\n')
    assert f"{lines} line 2 is not UTF-8 text" in _message([lines], tokenizer)
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(json.dumps(CHAT).encode() + b'\n{"messages": [{"role": "user", "content": "\xc3("}]}\n')
    assert f"{chat} line 2 is not UTF-8 text" in _message([chat], tokenizer)
    bad = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(np.array([0, 3, 6], np.int32).tobytes()),
                                                 pa.py_buffer(b"abc\xffde")])
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": bad}), table)
    assert f"{table} row 1 is not UTF-8 text" in _message([table], tokenizer)


def test_a_template_that_refuses_a_row(tmp_path, tokenizer):
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m['content'] == 'no' %}{{ raise_exception('no means no') }}"
                      "{% endif %}{{ m['content'] }}{% endfor %}")
    path = _jsonl(tmp_path / "c.jsonl", [CHAT, _turns(("user", "no"), ("assistant", "x"))])
    message = _message([path], tokenizer, chat_template=str(strict))
    assert f"{path} line 2: the chat template refuses it (no means no)" in message


def test_streamed_rows_are_named_too(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "s.jsonl", [{"text": TEXT}] * 5 + [{"text": 3}])
    stream = build_training_data([str(path)], tokenizer, 8, tmp_path / "cache", streaming=True)
    with pytest.raises(UserError, match=f"{path} line 6: its text is an int"):
        for _ in range(200):
            stream.next(1)


def test_rows_without_text_are_skipped_with_one_warning(tmp_path, tokenizer, caplog):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": TEXT}, {"body": "x"}, {"text": None}, {"text": TEXT}])
    build_packed_dataset([str(path)], tokenizer, 8)
    assert f"2 row(s) of {path} have no text (null, or no 'text' field) and are skipped; the first: {path} " \
           "line 2" in caplog.text


def test_the_cli_exits_2_with_one_line(tmp_path, tokenizer, capsys):
    # The case: `messages` holding a string ended in a 69-line traceback.
    teacher = tmp_path / "teacher"
    tokenizer.save_pretrained(teacher)
    path = _jsonl(tmp_path / "chat.jsonl", [CHAT, {"messages": "hello"}])
    assert main(["prepare", "--teacher", str(teacher), "--data", str(path), "--out", str(tmp_path / "p"),
                 "--seq-len", "8"]) == 2
    err = capsys.readouterr().err  # the progress bar (carriage returns) shares stderr
    errors = [line for line in err.splitlines() if line.startswith("lrc: error:")]
    assert "Traceback" not in err and errors == [f"lrc: error: {path} line 2: its conversation is a str, not a list "
                                                 "of turns; fix or remove that row"], err
    assert not (tmp_path / "p").exists()
