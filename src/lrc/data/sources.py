"""Where documents come from: `--data` items resolved to files, folders and hub splits, read with `datasets`.

Every source is read by `datasets` (the "text", "json" and "parquet" builders, `load_from_disk`, hub ids),
into a dataset with one column: ``text`` for plain documents, or ``messages`` for chat rows (a list of
``{"role", "content"}`` turns; ShareGPT's ``conversations`` of ``{"from", "value"}`` is read too). What
stays here is what `datasets` does not do: a deterministic walk of folders, the hub-id syntax, the
``PATH:WEIGHT`` syntax of mixtures, and one-line errors that name the file, line or field to fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lrc.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
# Files that `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their folder.
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
# The file `lrc prepare` writes into its --out folder (see `lrc.data.packed`).
PREPARED_MARKER = "lrc-tokens.json"
SUPPORTED = (".txt/.md/.text (one document per file), .jsonl, .json, .parquet, "
             "or a folder written by datasets' save_to_disk or by lrc prepare")
# [owner/]name[:config][@split]; a split may carry datasets' slicing syntax ("train[:10%]").
_HUB_ID = re.compile(
    r"(?P<repo>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]:%+-]+))?")
# A missing "corpus.jsonl" is a mistyped file, not a hub dataset: keep the plain "does not exist" error.
_FILE_LIKE = SUPPORTED_SUFFIXES + (".csv", ".tsv", ".gz", ".zst", ".arrow")
TEXT, CHAT = "text", "messages"  # the one column every loaded source is reduced to
_CHAT_COLUMNS = ("messages", "conversations")


@dataclass(frozen=True)
class HubDataset:
    """One split of a hub dataset; `str()` gives ``owner/name[:config]@split``. `dataset` holds the loaded split
    (or stream) once resolved; it is not part of equality, so the same split named twice is read once."""

    repo: str
    config: str | None = None
    split: str = "train"
    dataset: Any = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.repo + (f":{self.config}" if self.config else "") + f"@{self.split}"


DataSource = Path | HubDataset


def parse_hub_id(text: str) -> HubDataset | None:
    """``[owner/]name[:config][@split]`` (split "train" by default), or None: names ending in a data-file
    extension, and anything starting with ".", "/" or "~" or holding more than one "/", are not hub ids."""
    match = _HUB_ID.fullmatch(text)
    if match is None or match["repo"].lower().endswith(_FILE_LIKE):
        return None
    return HubDataset(match["repo"], match["config"], match["split"] or "train")


def split_weights(items: list[str]) -> list[tuple[list[str], float]]:
    """`--data` items -> sources with their mixture weights: ``a.jsonl b/`` is one source (weight 1), while
    ``web/:0.6 code.jsonl:0.4`` are two, sampled in proportion to 0.6 : 0.4 (the weights need not sum to 1).
    A trailing ``:NUMBER`` is a weight (a hub config is never a plain number)."""
    parsed = []
    for item in items:
        head, sep, tail = str(item).rpartition(":")
        try:
            weight = float(tail) if sep and head else None
        except ValueError:
            weight = None
        parsed.append((head, weight) if weight is not None else (str(item), None))
    weighted = [w is not None for _, w in parsed]
    if not any(weighted):
        return [([str(i) for i in items], 1.0)]
    if not all(weighted):
        plain = next(p for p, w in parsed if w is None)
        raise UserError(f"--data {plain} has no weight while other items have one; give every item a weight "
                        "(PATH:WEIGHT, e.g. web/:0.6 code.jsonl:0.4) or none")
    for path, weight in parsed:
        if not weight or weight <= 0 or weight != weight or weight == float("inf"):
            raise UserError(f"--data {path}:{weight} has a weight that is not a positive number; use e.g. {path}:0.5")
    return [([path], float(weight)) for path, weight in parsed]  # type: ignore[arg-type]


def _load_hub(source: HubDataset, raw: str | None = None, streaming: bool = False) -> HubDataset:
    import datasets  # imported lazily: slow to import

    try:
        loaded = datasets.load_dataset(source.repo, source.config, split=source.split,
                                       **({"streaming": True} if streaming else {}))
    except Exception as err:  # datasets raises many unrelated types: offline, unknown name, config or split
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        not_local = f" (there is no local path {raw} either)" if raw is not None else ""
        raise UserError(f"cannot load hub dataset {source}: {reason}; check the name, go online, or pass existing "
                        f"local files{not_local}") from err
    return replace(source, dataset=loaded)


def is_unit_folder(path: Path) -> bool:
    """A folder read as one dataset (save_to_disk or lrc prepare output), never searched for files."""
    return path.is_dir() and any((path / name).is_file() for name in (*SAVE_TO_DISK_MARKERS, PREPARED_MARKER))


def _walk(folder: Path, found: list[DataSource], skipped: list[Path]) -> None:
    """Usable entries under `folder`, depth first, in name order (the same on every machine); hidden entries
    (.git, .cache) are never data."""
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.append(entry) if is_unit_folder(entry) else _walk(entry, found, skipped)
        elif entry.is_file():
            (found if entry.suffix.lower() in SUPPORTED_SUFFIXES else skipped).append(entry)


def resolve_data_files(paths: Sequence[str | DataSource], streaming: bool = False) -> list[DataSource]:
    """Data paths -> the files, dataset folders and hub splits to read, resolved, in order, without duplicates.

    A folder is searched recursively in name order (hidden entries and other extensions skipped) unless it
    was written by save_to_disk or `lrc prepare`; a file named explicitly must have a supported extension. A
    path that does not exist but reads as a hub id is loaded here (as a stream with `streaming`), so an
    unavailable dataset fails before anything is written.
    """
    if not paths:
        raise UserError("no data paths given: pass at least one data file or folder")
    found: list[DataSource] = []
    skipped: list[Path] = []
    for raw in paths:
        if isinstance(raw, HubDataset):  # resolved before: not loaded twice
            found.append(raw if raw.dataset is not None else _load_hub(raw, streaming=streaming))
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            hub = parse_hub_id(str(raw))
            if hub is None:
                raise UserError(f"data path {raw} does not exist: check the spelling, or pass an existing file or "
                                "folder")
            found.append(_load_hub(hub, str(raw), streaming))
        elif path.is_dir():
            found.append(path) if is_unit_folder(path) else _walk(path, found, skipped)
        elif path.suffix.lower() in SUPPORTED_SUFFIXES:
            found.append(path)
        else:
            raise UserError(f"data file {raw} has an unsupported format '{path.suffix or '(no extension)'}': "
                            f"supported are {SUPPORTED}")
    unique = list(dict.fromkeys(p if isinstance(p, HubDataset) else p.resolve() for p in found))
    if not unique:
        note = f" (skipped {len(skipped)} file(s) with other extensions)" if skipped else ""
        raise UserError(f"no usable data files in {', '.join(map(str, paths))}{note}: supported are {SUPPORTED}")
    return unique


# ------------------------------------------------------------------------------------------- reading


def _fields(names) -> str:
    names = [str(n) for n in names]
    return (", ".join(names[:20]) + (", ..." if len(names) > 20 else "")) if names else "none"


def _builder(path: Path) -> str:
    suffix = path.suffix.lower()
    return "text" if suffix in TEXT_SUFFIXES else "json" if suffix in JSON_SUFFIXES else "parquet"


def _first_bad_json(path: Path) -> str | None:
    """Only on a failed load: which line (or item) of a JSON file is at fault, for the error message."""
    hint = "each line of a .jsonl file must be one JSON object" if path.suffix.lower() == ".jsonl" else \
        "a .json file must hold a JSON list of objects, or one JSON object per line"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        return f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8"
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path} is not valid JSON ({err.msg} at line {err.lineno}); {hint}"
        where = [(f"{path} item {i}", row) for i, row in enumerate(rows)]
    else:
        where = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    where.append((f"{path} line {number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    return f"{path} line {number} is not valid JSON ({err.msg}); {hint}"
    for name, row in where:
        if not isinstance(row, dict):
            return f"{name} is a JSON {type(row).__name__}, not an object; {hint}"
    return None


def _load_files(files: list[Path], streaming: bool) -> Any:
    """One `datasets.load_dataset` call for consecutive files of one kind."""
    import datasets

    kind = _builder(files[0])
    options: dict[str, Any] = {"sample_by": "document", "encoding": "utf-8-sig"} if kind == "text" else {}
    try:
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=streaming,
                                     **options)
    except Exception as err:  # datasets wraps the parser's error in DatasetGenerationError
        cause = err.__cause__ or err
        if isinstance(cause, UnicodeDecodeError) or kind == "json":
            for f in files:
                reason = _first_bad_json(f) if kind == "json" else None
                if reason is None and isinstance(cause, UnicodeDecodeError):
                    reason = f"{f} is not UTF-8 text ({cause.reason}); convert it to UTF-8"
                if reason:
                    raise UserError(reason) from err
        named = files[0] if len(files) == 1 else f"{files[0]} (or one of {len(files) - 1} more {kind} files)"
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"cannot read {named} ({reason}); check or re-export the file") from err


def _load_saved(path: Path) -> tuple[Any, str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # several unrelated types for a damaged folder
        raise UserError(f"{path} could not be loaded with datasets.load_from_disk ({type(err).__name__}: {err}); "
                        "re-save it with save_to_disk") from err
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded), None)
        if split is None:
            return datasets.Dataset.from_dict({TEXT: []}), str(path)
        return loaded[split], f"{path} (split '{split}')"
    return loaded, str(path)


def _one_column(ds: Any, where: str, text_field: str) -> Any:
    """`ds` reduced to its document column, renamed to TEXT (or CHAT for conversation rows), type-checked."""
    names = list(ds.column_names or next(iter(ds), {}).keys())  # a stream may not know its columns before reading
    if text_field in names:
        column, kind = text_field, TEXT
    elif chat := next((c for c in _CHAT_COLUMNS if c in names), None):
        column, kind = chat, CHAT
    else:
        raise UserError(f"{where} has no field '{text_field}'; pass --text-field NAME (fields: {_fields(names)})")
    if kind == TEXT and ds.features is not None:
        dtype = getattr(ds.features[column], "dtype", type(ds.features[column]).__name__)
        if dtype not in ("string", "large_string"):
            raise UserError(f"{where} field '{column}' holds {dtype} values, not text; pass --text-field NAME of a "
                            "text field")
    ds = ds.select_columns([column])
    return ds.rename_column(column, kind) if column != kind else ds


def load_documents(files: list[DataSource], text_field: str = "text", streaming: bool = False) -> list[Any]:
    """The sources as `datasets` datasets of one column each (TEXT or CHAT), in order: consecutive files of one
    kind share one `load_dataset` call (a folder of 10,000 .txt files is one call, not 10,000)."""
    parts: list[Any] = []
    run: list[Path] = []

    def flush():
        if run:
            where = str(run[0]) if len(run) == 1 else f"the {_builder(run[0])} files {run[0]}, ..."
            parts.append(_one_column(_load_files(run, streaming), where, text_field))
            run.clear()

    for src in files:
        if isinstance(src, HubDataset):
            flush()
            loaded = src.dataset if src.dataset is not None else _load_hub(src, streaming=streaming).dataset
            parts.append(_one_column(loaded, f"hub dataset {src}", text_field))
        elif src.is_dir():
            flush()
            if (src / PREPARED_MARKER).is_file():
                raise UserError(f"{src} holds tokens prepared by `lrc prepare`; give it as the only --data item "
                                "of its source, not mixed with raw files")
            ds, where = _load_saved(src)
            parts.append(_one_column(ds.to_iterable_dataset() if streaming else ds, where, text_field))
        else:
            if run and _builder(run[0]) != _builder(src):
                flush()
            run.append(src)
    flush()
    return parts


def iter_documents(paths: list[DataSource], text_field: str = "text"):
    """The non-blank documents (texts, or message lists for chat rows) of resolved sources, in order."""
    for part in load_documents(list(paths), text_field):
        column = part.column_names[0]
        for batch in part.iter(batch_size=1024):
            for doc in batch[column]:
                if doc and (column != TEXT or doc.strip()):
                    yield doc


def file_fingerprints(files: list[DataSource]) -> list[list[Any]]:
    """(path, size, mtime_ns) of every file (each file inside a dataset folder); for a hub split its id and
    the fingerprint `datasets` gives it. Contents are not hashed: that would cost as much as reading them."""
    rows: list[list[Any]] = []
    for path in files:
        if isinstance(path, HubDataset):
            rows.append(["hub", path.repo, path.config, path.split, getattr(path.dataset, "_fingerprint", None)])
            continue
        for member in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            stat = member.stat()
            rows.append([str(member), stat.st_size, stat.st_mtime_ns])
    return rows
