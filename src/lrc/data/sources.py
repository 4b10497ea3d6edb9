"""`--data` items -> files, dataset folders and hub splits, read with `datasets` into one column: ``text``, or
``messages`` for chat rows. Kept here is what `datasets` does not do: a deterministic folder walk, the hub-id and
``PATH:WEIGHT`` syntax, and one-line errors naming the file, line or field to fix."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lrc.data.chat import _a, conversation_problem
from lrc.errors import UserError

KINDS = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# The files `save_to_disk` writes at the top of its folder, and the one `lrc prepare` writes (lrc.data.build).
SAVED_MARKERS, PREPARED_MARKER = ("dataset_dict.json", "dataset_info.json", "state.json"), "lrc-tokens.json"
SUPPORTED = (".txt/.md/.text (one document per file), .jsonl, .json, .parquet, or a folder written by datasets' "
             "save_to_disk or by lrc prepare")
# [owner/]name[:config][@split]; a split may carry datasets' slicing syntax ("train[:10%]").
_HUB_ID = re.compile(
    r"(?P<repo>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]:%+-]+))?")
_FILE_LIKE = (*KINDS, ".csv", ".tsv", ".gz", ".zst", ".arrow")  # a missing "x.jsonl" is a typo, not a hub id
TEXT, CHAT = "text", "messages"


@dataclass(frozen=True)
class HubDataset:
    """A hub split, ``owner/name[:config]@split``; `dataset` (the loaded split) is not part of equality."""

    repo: str
    config: str | None = None
    split: str = "train"
    dataset: Any = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.repo + (f":{self.config}" if self.config else "") + f"@{self.split}"


DataSource = Path | HubDataset


def parse_hub_id(text: str) -> HubDataset | None:
    """``[owner/]name[:config][@split]`` or None (data-file names, paths starting with . / ~, two slashes)."""
    match = _HUB_ID.fullmatch(text)
    if match is None or match["repo"].lower().endswith(_FILE_LIKE):
        return None
    return HubDataset(match["repo"], match["config"], match["split"] or "train")


def split_weights(items: Sequence[str]) -> list[tuple[list[str], float]]:
    """``a.jsonl b/`` is one source; ``web/:0.6 code.jsonl:0.4`` are two, drawn 0.6 : 0.4. A trailing
    ``:NUMBER`` is a weight (a hub config is never a bare number)."""
    parsed: list[tuple[str, float | None]] = []
    for item in map(str, items):
        head, _, tail = item.rpartition(":")
        try:
            parsed.append((head, float(tail)) if head else (item, None))
        except ValueError:
            parsed.append((item, None))
    if all(w is None for _, w in parsed):
        return [([p for p, _ in parsed], 1.0)]
    for path, weight in parsed:
        if weight is None:
            raise UserError(f"--data {path} has no weight while other items have one; give every item a weight "
                            "(PATH:WEIGHT, e.g. web/:0.6 code.jsonl:0.4) or none")
        if not 0 < weight < float("inf"):
            raise UserError(f"--data {path}:{weight} has a weight that is not a positive number; use e.g. {path}:0.5")
    return [([path], float(weight or 0)) for path, weight in parsed]


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _load_hub(source: HubDataset, raw: str | None = None, streaming: bool = False) -> HubDataset:
    import datasets  # heavy (pandas, pyarrow): only when data is read

    try:
        return replace(source, dataset=datasets.load_dataset(source.repo, source.config, split=source.split,
                                                             **({"streaming": True} if streaming else {})))
    except Exception as err:  # many unrelated types: offline, unknown name, config or split
        reason = first_line(err)
        not_local = f" (there is no local path {raw} either)" if raw is not None else ""
        raise UserError(f"cannot load hub dataset {source}: {reason}; check the name, go online, or pass existing "
                        f"local files{not_local}") from err


def _walk(folder: Path, found: list[DataSource], skipped: list[Path]) -> None:
    """A saved dataset or `lrc prepare` folder is one source; others are walked depth first in name order (the
    same on every machine), skipping hidden entries (.git, .cache)."""
    if any((folder / name).is_file() for name in (*SAVED_MARKERS, PREPARED_MARKER)):
        found.append(folder)
        return
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_dir() and not entry.name.startswith("."):
            _walk(entry, found, skipped)
        elif entry.is_file() and not entry.name.startswith("."):
            (found if entry.suffix.lower() in KINDS else skipped).append(entry)


def resolve_data_files(paths: Sequence[str | DataSource], streaming: bool = False) -> list[DataSource]:
    """Resolved files, dataset folders and hub splits, in order, without duplicates. A hub id is loaded here
    (a stream with `streaming`), so it fails before anything is written."""
    if not paths:
        raise UserError("no data paths given: pass at least one data file or folder")
    found: list[DataSource] = []
    skipped: list[Path] = []
    for raw in paths:
        path = raw if isinstance(raw, HubDataset) else Path(raw).expanduser()
        if isinstance(path, HubDataset):
            found.append(path if path.dataset is not None else _load_hub(path, streaming=streaming))
        elif not path.exists():
            hub = parse_hub_id(str(raw))
            if hub is None:
                raise UserError(f"data path {raw} does not exist: check the spelling, or pass an existing file or "
                                "folder")
            found.append(_load_hub(hub, str(raw), streaming))
        elif path.is_dir():
            _walk(path, found, skipped)
        elif path.suffix.lower() in KINDS:
            found.append(path)
        else:
            raise UserError(f"data file {raw} has an unsupported format '{path.suffix or '(no extension)'}': "
                            f"supported are {SUPPORTED}")
    if not found and any(p.name.startswith("tokens.") and p.suffix == ".bin" for p in skipped):
        raise UserError(f"{', '.join(map(str, paths))} holds the files of an `lrc prepare` that did not finish (no "
                        f"{PREPARED_MARKER}, written last); run the same `lrc prepare` again to complete it")
    if not found:
        note = f" (skipped {len(skipped)} file(s) with other extensions)" if skipped else ""
        raise UserError(f"no usable data files in {', '.join(map(str, paths))}{note}: supported are {SUPPORTED}")
    return list(dict.fromkeys(p if isinstance(p, HubDataset) else p.resolve() for p in found))


def _bad_json(path: Path, text_field: str = TEXT) -> str | None:
    """After a failed load only: the line (or item) of a JSON file at fault, for the message: not UTF-8, not
    JSON, not an object, or a text or conversation of the wrong type (which `datasets` cannot mix in a column)."""
    hint = "each line must be one JSON object (a .json file may also hold a list of objects)"
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        at_line = raw.count(b"\n", 0, err.start) + 1
        return f"{path} line {at_line} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8"
    rows = []
    if text.lstrip()[:1] == "[":
        try:
            rows = [(f"{path} item {i}", row) for i, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as err:
            return f"{path} is not valid JSON ({err.msg} at line {err.lineno}); {hint}"
    for number, line in enumerate([] if rows else text.splitlines(), start=1):
        try:
            rows.append((f"{path} line {number}", json.loads(line))) if line.strip() else None
        except json.JSONDecodeError as err:
            return f"{path} line {number} is not valid JSON ({err.msg}); {hint}"
    for name, row in rows:
        if not isinstance(row, dict):
            return f"{name} is a JSON {type(row).__name__}, not an object; {hint}"
        value = row.get(text_field)
        if value is not None and not isinstance(value, str):
            return f"{name}: its text is {_a(type(value).__name__)}, not a string; fix or remove that row"
        chat = next((c for c in (CHAT, "conversations") if c in row), None)
        if text_field not in row and chat and (problem := conversation_problem(row[chat])):
            return f"{name}: {problem}; fix or remove that row"
    return None


def _kind(source: DataSource) -> str | None:  # a data file's builder; None for a folder or hub split
    return KINDS.get(source.suffix.lower()) if isinstance(source, Path) and not source.is_dir() else None


def _load_files(kind: str, files: list, streaming: bool, text_field: str = TEXT) -> Any:
    import datasets  # heavy (pandas, pyarrow): only when data is read

    text = {"sample_by": "document", "encoding": "utf-8-sig"} if kind == "text" else {}
    try:
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=streaming,
                                     **text)
    except Exception as err:  # the parser's error, wrapped in DatasetGenerationError
        cause = err.__cause__ or err
        for f in files if kind == "json" else []:
            if reason := _bad_json(f, text_field):
                raise UserError(reason) from err
        why = f"not UTF-8 text ({cause.reason})" if isinstance(cause, UnicodeDecodeError) else \
            first_line(cause)
        raise UserError(f"cannot read {files[0]}{f' or one of {len(files) - 1} more' if len(files) > 1 else ''} "
                        f"({why}); check or re-export the file") from err


def _load_saved(path: Path) -> tuple[Any, str]:
    import datasets  # heavy (pandas, pyarrow): only when data is read

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # several unrelated types for a damaged folder
        raise UserError(f"{path} could not be loaded with datasets.load_from_disk ({type(err).__name__}: {err}); "
                        "re-save it with save_to_disk") from err
    if isinstance(loaded, datasets.DatasetDict):  # the "train" split, else the first
        split = "train" if "train" in loaded else next(iter(loaded), None)
        return (loaded[split], f"{path} (split '{split}')") if split else (datasets.Dataset.from_dict({TEXT: []}),
                                                                           str(path))
    return loaded, str(path)


def columns(ds: Any) -> list[str]:  # a stream without known features shows them only in a row
    return list(ds.column_names or next(iter(ds), {}).keys())


def _one_column(ds: Any, where: str, text_field: str) -> Any:  # `ds` as column TEXT (type-checked) or CHAT
    names = columns(ds)
    column = text_field if text_field in names else next((c for c in ("messages", "conversations") if c in names), 0)
    if not column:
        raise UserError(f"{where} has no field '{text_field}'; pass --text-field NAME (fields: "
                        f"{', '.join(names[:20]) or 'none'})")
    dtype = getattr((ds.features or {}).get(column), "dtype", "string")
    if column == text_field and dtype not in ("string", "large_string"):
        raise UserError(f"{where} field '{column}' holds {dtype} values, not text; pass --text-field NAME")
    ds = ds.select_columns([column])
    target = TEXT if column == text_field else CHAT
    return ds if column == target else ds.rename_column(column, target)


def _rows_of(path: Path, kind: str) -> list[str]:
    """Names of a file's rows, in the order `datasets` reads them (only to name a row in an error)."""
    if kind == "text":
        return [str(path)]  # one document per file
    if kind == "parquet":
        import pyarrow.parquet as pq  # heavy: only when data is read

        return [f"{path} row {i}" for i in range(pq.ParquetFile(path).metadata.num_rows)]
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"[":
        try:
            return [f"{path} item {i}" for i in range(len(json.loads(raw)))]
        except ValueError:
            pass
    return [f"{path} line {n}" for n, line in enumerate(raw.split(b"\n"), start=1) if line.strip()]


@dataclass(frozen=True)
class Origin:
    """Where the rows of one loaded part come from: consecutive files of one kind (`kind`), or one saved
    dataset or hub split (`kind` None, named `where`). Names a row for an error message."""

    sources: tuple[DataSource, ...]
    kind: str | None
    where: str

    def row(self, index: int) -> str:
        """`index` (0-based, in the part) as FILE line N (1-based) / item N / row N (0-based), or FILE."""
        if self.kind is None:
            return f"{self.where} row {index}"
        names: list[str] = []
        for source in self.sources:
            names += _rows_of(Path(str(source)), self.kind)
            if index < len(names):
                return names[index]
        return f"{self.where} row {index}"

    def first_undecodable(self, ds: Any) -> int | None:
        """The first row of `ds` whose text is not valid UTF-8 (decoded one by one: only after a failure)."""
        table = ds.with_format("arrow")
        for start in range(0, len(ds), 1024):
            try:
                table[start:start + 1024].to_pylist()
                continue
            except UnicodeDecodeError:
                pass
            for i in range(start, min(start + 1024, len(ds))):
                try:
                    table[i:i + 1].to_pylist()
                except UnicodeDecodeError:
                    return i
        return None


def load_documents(files: Sequence[DataSource], text_field: str = "text", streaming: bool = False) -> list[Any]:
    return [part for part, _ in load_parts(files, text_field, streaming)]


def load_parts(files: Sequence[DataSource], text_field: str = "text", streaming: bool = False
               ) -> list[tuple[Any, Origin]]:
    """Each part read with `datasets` as one column (TEXT or CHAT), with where its rows come from."""
    parts: list[tuple[Any, Origin]] = []
    # Consecutive files of one kind are one `load_dataset` call (10,000 .txt files: one call, not 10,000).
    for kind, group in itertools.groupby(files, _kind):
        run = list(group)
        if kind:
            ds = _load_files(kind, run, streaming, text_field)
            where = str(run[0]) + (", ..." if run[1:] else "")
            parts.append((_one_column(ds, where, text_field), Origin(tuple(run), kind, where)))
            continue
        for src in run:
            if isinstance(src, HubDataset):
                loaded = src.dataset if src.dataset is not None else _load_hub(src, streaming=streaming).dataset
                where = f"hub dataset {src}"
                parts.append((_one_column(loaded, where, text_field), Origin((src,), None, where)))
                continue
            if (src / PREPARED_MARKER).is_file():
                raise UserError(f"{src} holds tokens from `lrc prepare`: give it alone as a --data source")
            ds, where = _load_saved(src)
            parts.append((_one_column(ds.to_iterable_dataset() if streaming else ds, where, text_field),
                          Origin((src,), None, where)))
    return parts


def iter_documents(paths: Sequence[DataSource], text_field: str = "text"):
    """The non-blank documents (texts, or turn lists of chat rows) of resolved sources, in order."""
    for part in load_documents(paths, text_field):
        for batch in part.iter(batch_size=1024):
            yield from (d for d in batch[part.column_names[0]] if d and (not isinstance(d, str) or d.strip()))


def file_fingerprints(files: Sequence[DataSource]) -> list[list[Any]]:
    """(path, size, mtime_ns) of every file, in dataset folders too (contents are not hashed: that costs a full
    read); a hub split's id and `datasets` fingerprint."""
    rows: list[list[Any]] = []
    for f in files:
        if isinstance(f, HubDataset):
            rows.append(["hub", f.repo, f.config, f.split, getattr(f.dataset, "_fingerprint", None)])
        else:
            members = sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
            rows += [[str(m), m.stat().st_size, m.stat().st_mtime_ns] for m in members]
    return rows
