"""`--wandb PROJECT`: the records of metrics.jsonl reach W&B, checked in W&B's offline mode (no network)."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from helpers import save_teacher, write_data

from lrc.cli import main
from lrc.train.tracking import scalars

ARGS = ["--method", "lrc",
        "--hidden-size", "32", "--seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--log-every", "1",
        "--eval-every", "2", "--eval-batches", "1", "--device", "cpu", "--precision", "fp32"]


def _wandb_records(path):
    """The protobuf records of an offline run's .wandb file: wandb's LevelDB-style log (a 7-byte file header,
    then 32 KiB blocks of chunks, each with a 7-byte header: checksum, length, kind 1 full / 2 first /
    3 middle / 4 last). wandb's Python package has no reader of its own since its core moved to Go."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                 "WANDB_DATA_DIR": tmp_path / "wandb-data", "LRC_CACHE": tmp_path / "cache"}.items():
        monkeypatch.setenv(k, str(v))


@pytest.mark.slow
def test_wandb_offline_gets_every_metrics_record(tmp_path, offline_wandb):
    pytest.importorskip("wandb")
    teacher, data, out = save_teacher(tmp_path / "t"), write_data(tmp_path / "data"), tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS,
                 "--wandb", "lrc-test"]) == 0
    import wandb

    wandb.teardown()  # the finished run's log is flushed to disk by wandb's service process, when it stops
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].name == f"run-{(out / 'wandb-id').read_text().strip()}.wandb"
    records = list(_wandb_records(runs[0]))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "lrc-test"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["hidden_size"] == 32 and config["wandb"] == "lrc-test"  # the resolved RunConfig
    logged: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            logged.setdefault(int(row["_step"]), {}).update(row)
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in jsonl} >= {"train", "val"} and sorted(logged) == [0, 1, 2, 3, 4]
    for record in jsonl:
        want = scalars(record)
        assert want and {k: logged[record["step"]][k] for k in want} == pytest.approx(want), record
    wanted = {k for r in jsonl for k in scalars(r)}
    assert {k for row in logged.values() for k in row if not k.startswith("_")} == wanted  # nothing else


def test_wandb_missing_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("LRC_CACHE", str(tmp_path / "cache"))
    teacher, data, out = save_teacher(tmp_path / "t"), write_data(tmp_path / "data"), tmp_path / "run"
    capsys.readouterr()  # saving prints a progress bar
    assert main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS,
                 "--wandb", "p"]) == 2
    err = capsys.readouterr().err
    assert "--wandb needs the wandb package" in err and err.count("\n") == 1
    assert not out.exists()


def test_scalars_are_split_prefixed_numbers():
    assert scalars({"split": "val", "step": 3, "loss": 1.5, "tokens": 7, "note": "x", "flag": True}) == \
        {"val/loss": 1.5, "val/tokens": 7}
