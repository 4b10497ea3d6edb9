"""Data pipeline for distillation: raw text files -> one packed token stream -> fixed-length sequences.

The text comes from local files and folders, or from a Hugging Face hub dataset named as
``[owner/]name[:config][@split]`` (see `parse_hub_id`), which `datasets.load_dataset` downloads into its
own cache when the machine is online.

The trainer sees the corpus as `PackedDataset`: every document is tokenised the way the teacher's own
tokenizer frames a text (see `DocumentTemplate`): the special tokens it puts before a text when called with
``add_special_tokens=True`` (its BOS where it adds one: Llama 3's ``<|begin_of_text|>``, Mistral's ``<s>``;
nothing for Qwen), then the text tokens, then exactly one EOS. A teacher fed documents without the BOS it
was trained with sees unfamiliar input, and its logits (the distillation target) on each document's first
tokens are off. The documents are concatenated into one flat int32 array, which is cut into back-to-back
sequences of `seq_len` tokens. Nothing is padded, so every token in a batch is real training signal.

Packing means a sequence may hold the end of one document and the start of the next, and may start in
the middle of a document. Two per-token tensors keep documents apart:

* ``position_ids`` count from the real start of the token's document (not from the start of the
  sequence): 0 on the document's first token (its BOS where there is one), and a sequence cut from the
  middle of a document continues counting (e.g. 37, 38, ...), so a document split across two sequences
  gets the same positions as if it were whole;
* ``labels`` are -100 wherever the next token belongs to another document, so the model is never
  trained to predict the first token of an unrelated document from the previous one's EOS.

Why continuation sequences keep counting instead of restarting at 0: with rotary embeddings (the default
and llama3 RoPE of the supported families) the attention score of two tokens depends only on the offset
between their positions, so shifting a whole window by a constant changes nothing; a continuation
sequence is attended exactly like its tokens alone with positions from 0 (it cannot see the document's
earlier tokens, which lie in another sequence: that is inherent to packing). Keeping the positions the
document had when whole makes them independent of where the sequence cuts fall, and leaves 0 as the one
mark of a document start.

Attention stays inside each document too: given these ``position_ids``, no attention mask and no KV
cache, transformers' masking code (``find_packed_sequence_indices`` in masking_utils, used for the
eager, sdpa and flex backends) starts a new document wherever a position is not the previous one plus 1
and builds a block-diagonal causal mask. It compares each position with the one before only, so a first
segment that starts above 0 (a continuation) is one document like any other. The flash-attention
backends do not use that code (transformers 5.x): at batch size > 1 they do not separate packed documents
at all, and at batch size 1 they take the positions equal to the smallest one as the document starts,
which leaves out a first segment that does not start at 0. These batches are meant for the eager, sdpa
and flex backends.

Caveat: positions of a document longer than the teacher's context go past its
``max_position_embeddings``. That is harmless for default and llama3 RoPE (fixed frequencies, relative
offsets only); RoPE variants that choose their frequencies from the largest position id ("dynamic",
"longrope") would see such a sequence as a long one.

Other trade-offs:

* Documents are streamed from disk and tokenised in batches, so the corpus text is never held in memory
  all at once; the token stream itself is, unless a cache folder is given, in which case it is written
  to disk in chunks and memory-mapped (4 bytes per token; every rank maps the same pages).
* The cache is keyed on file paths, sizes and modification times, not on file contents: hashing a large
  corpus on every start would cost as much as re-reading it. An edit that keeps both size and mtime
  unchanged is not noticed. Stale cache files are never deleted automatically.
* A hub dataset is keyed on its id, config, split and the fingerprint `datasets` gives the loaded split
  (a hash of its cache folder's name, which changes with a new revision of the dataset). It is loaded
  when the paths are resolved, so that a missing one fails early; `build_packed_dataset` given the
  resolved sources reads the loaded split instead of loading it again.
* The key also holds the tokenizer (its serialised form) and the document template detected from it, so
  a tokenizer that frames documents differently, or a cache of an older format, is never reused.
* The key does not include `seq_len`: the token stream does not depend on it, so changing the sequence
  length reuses the cache.
* The tail of the stream that does not fill a whole sequence is dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrc.errors import UserError
from lrc.losses import next_token_labels

logger = logging.getLogger(__name__)


TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
# Files that `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top of their folder.
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")

_SUPPORTED_DESCRIPTION = (
    ".txt/.md/.text (one document per file), .jsonl, .json, .parquet, "
    "or a folder written by datasets' save_to_disk"
)
# Bump when the cache file layout or the tokenisation recipe changes, so old caches are not reused.
_CACHE_FORMAT = "lrc-packed-tokens-v2"  # v2: documents framed as the tokenizer frames a text
# [owner/]name[:config][@split]; repo names follow the hub's rules (letters, digits, "-", "_", "."), a split
# may carry datasets' slicing syntax ("train[:10%]", "train+validation").
_HUB_ID = re.compile(
    r"(?P<repo>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]:%+-]+))?"
)
# A missing "corpus.jsonl" is a mistyped file, not a hub dataset: keep the plain "does not exist" error.
_FILE_LIKE_SUFFIXES = SUPPORTED_SUFFIXES + (".csv", ".tsv", ".gz", ".zst", ".arrow")


# --------------------------------------------------------------------------------------------------
# Packed dataset
# --------------------------------------------------------------------------------------------------


@dataclass
class PackedDataset:
    """A packed token stream cut into fixed-length training sequences.

    Attributes:
        tokens: 1-D int32 array (a read-only `np.memmap` when it comes from the cache): all documents
            concatenated, each framed as the tokenizer frames a text (see `DocumentTemplate`) and ending
            with one EOS.
        doc_starts: 1-D int64 array, sorted: the offset in `tokens` of the first token of each document
            (its BOS where the tokenizer adds one).
            The first entry may be negative: a dataset cut out of a larger stream (see `split_holdout`)
            keeps the real start of the document it begins in, so that position ids stay correct.
        seq_len: tokens per sequence.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    seq_len: int

    def __post_init__(self) -> None:
        # Cheap structural checks only: these catch programming mistakes, not bad user data.
        if self.tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {self.tokens.shape}")
        self.doc_starts = np.asarray(self.doc_starts, dtype=np.int64)
        if self.doc_starts.ndim != 1:
            raise ValueError(f"doc_starts must be 1-D, got shape {self.doc_starts.shape}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if len(self.tokens) and (len(self.doc_starts) == 0 or self.doc_starts[0] > 0):
            raise ValueError("doc_starts must have an entry at or before offset 0 of tokens")

    def __len__(self) -> int:
        """Number of full sequences; the tail shorter than `seq_len` is dropped."""
        return len(self.tokens) // self.seq_len

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """Return sequence `index` as int64 tensors of shape (seq_len,).

        Keys: "input_ids" (the tokens), "position_ids" (offset of each token from the start of its
        document, even when that start lies in an earlier sequence) and "labels" (the next token, or
        -100 at the last position and wherever the next token starts another document; the EOS ends
        its own document, so the label before EOS is EOS and the label at EOS is -100).

        Position 0 is a document's first token (its BOS where the tokenizer adds one) and nothing else. A
        sequence that starts in the middle of a document continues that document's count (say 37, 38, ...)
        rather than restarting at 0, because:

        * RoPE attention depends only on the offset between two positions, so the window is attended
          exactly as its tokens alone would be with positions from 0; the numbers equal those the
          document had when whole, whatever the cut points;
        * transformers finds packed documents where a position is not the previous one plus 1
          (``find_packed_sequence_indices``), so a first segment that starts above 0 is still one document,
          and 0 stays the one mark of a document start (used for the labels here and by the trainer).

        A document longer than the teacher's context gets positions past ``max_position_embeddings``:
        harmless for default and llama3 RoPE, not for variants that pick frequencies from the largest
        position (see the module docstring).
        """
        if not 0 <= index < len(self):
            raise IndexError(f"sequence index {index} out of range for {len(self)} sequences")
        start = index * self.seq_len
        stop = start + self.seq_len
        input_ids = np.asarray(self.tokens[start:stop], dtype=np.int64)

        # For each absolute offset, the document it belongs to is the last one starting at or before it.
        offsets = np.arange(start, stop, dtype=np.int64)
        doc_index = np.searchsorted(self.doc_starts, offsets, side="right") - 1
        position_ids = offsets - self.doc_starts[doc_index]

        ids, pos = torch.from_numpy(input_ids), torch.from_numpy(position_ids)
        # A next token at position 0 opens a new document: nothing to learn from predicting it.
        return {"input_ids": ids, "position_ids": pos, "labels": next_token_labels(ids, pos)}

    # Lets the dataset be used directly as a map-style dataset (e.g. with torch.utils.data.DataLoader).
    # Note: pickling (DataLoader workers under "spawn") copies a memmap's contents into the pickle.
    __getitem__ = get


# --------------------------------------------------------------------------------------------------
# Finding and reading files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubDataset:
    """One split of a Hugging Face hub dataset; `str()` gives it back as ``owner/name[:config]@split``.

    `dataset` holds the loaded `datasets.Dataset` once `resolve_data_files` has loaded it (not part of
    equality, so the same split named twice is read once).
    """

    repo: str
    config: str | None = None
    split: str = "train"
    dataset: Any = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.repo + (f":{self.config}" if self.config else "") + f"@{self.split}"


# A resolved data source: a local file or folder, or a hub dataset split.
DataSource = Path | HubDataset


def parse_hub_id(text: str) -> HubDataset | None:
    """Read ``[owner/]name[:config][@split]`` (split "train" by default), or None if `text` is not of that form.

    Names ending in a data-file extension (``corpus.jsonl``) are not taken for hub ids, nor is anything
    starting with ".", "/" or "~" or holding more than one "/".
    """
    match = _HUB_ID.fullmatch(text)
    if match is None or match["repo"].lower().endswith(_FILE_LIKE_SUFFIXES):
        return None
    return HubDataset(match["repo"], match["config"], match["split"] or "train")


def _load_hub_dataset(source: HubDataset, raw: str | Path | None = None) -> HubDataset:
    """`source` with its split loaded by `datasets.load_dataset` (which downloads and caches it)."""
    import datasets  # imported lazily: it is slow to import and only needed for this source

    try:
        loaded = datasets.load_dataset(source.repo, source.config, split=source.split)
    except Exception as err:  # datasets raises many unrelated types: offline, unknown name, config or split
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        not_local = f" (there is no local path {raw} either)" if raw is not None else ""
        raise UserError(
            f"cannot load hub dataset {source}: {reason}; "
            f"check the name, go online, or pass existing local files{not_local}"
        ) from err
    return replace(source, dataset=loaded)


def _is_save_to_disk_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in SAVE_TO_DISK_MARKERS)


def _walk_folder(folder: Path, found: list[DataSource], skipped: list[Path]) -> None:
    """Collect usable entries under `folder`, depth first, in name order (deterministic across machines)."""
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        # Hidden entries are VCS/editor/cache litter (.git, .cache, .DS_Store), never training data.
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _is_save_to_disk_folder(entry):
                found.append(entry)  # a dataset folder is one unit: its .json/.arrow files are not text
            else:
                _walk_folder(entry, found, skipped)
        elif entry.is_file():
            if entry.suffix.lower() in SUPPORTED_SUFFIXES:
                found.append(entry)
            else:
                skipped.append(entry)


def resolve_data_files(paths: Sequence[str | DataSource]) -> list[DataSource]:
    """Expand user-given data paths into the list of data files to read, in a deterministic order.

    Each path may be a data file (.txt, .md, .text, .jsonl, .json, .parquet), a folder written by
    `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` (recognised by its dataset_info.json,
    state.json or dataset_dict.json), or any other folder, which is searched recursively in name order;
    inside a searched folder, hidden entries and files with other extensions are skipped, while a file
    named explicitly must have a supported extension. Paths are returned resolved (absolute), in the
    order given, without duplicates (a file named twice, or named and also inside a named folder, is
    read once).

    A path that does not exist but reads as a hub dataset id (see `parse_hub_id`) is loaded with
    `datasets.load_dataset` here, so that an unavailable dataset fails before anything is written; it is
    returned as a `HubDataset` holding the loaded split.

    Raises:
        UserError: a path does not exist (and is no loadable hub dataset), a named file has an unsupported
            extension, or no usable file was found.
    """
    if not paths:
        raise UserError("no data paths given: pass at least one data file or folder")
    found: list[DataSource] = []
    skipped: list[Path] = []
    path: DataSource  # a Path while resolving below, then each found source in turn
    for raw in paths:
        if isinstance(raw, HubDataset):  # resolved before (e.g. by the trainer's checks): not loaded twice
            found.append(raw if raw.dataset is not None else _load_hub_dataset(raw))
            continue
        path = Path(raw).expanduser()
        if not path.exists():
            hub = parse_hub_id(str(raw))
            if hub is None:
                raise UserError(
                    f"data path {raw} does not exist: check the spelling, or pass an existing file or folder"
                )
            found.append(_load_hub_dataset(hub, raw))
            continue
        if path.is_dir():
            if _is_save_to_disk_folder(path):
                found.append(path)
            else:
                _walk_folder(path, found, skipped)
        elif path.suffix.lower() in SUPPORTED_SUFFIXES:
            found.append(path)
        else:
            raise UserError(
                f"data file {raw} has an unsupported format '{path.suffix or '(no extension)'}': "
                f"supported are {_SUPPORTED_DESCRIPTION}"
            )

    unique: list[DataSource] = []
    seen: set[DataSource] = set()
    for path in found:
        resolved = path if isinstance(path, HubDataset) else path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(resolved)
    if not unique:
        note = f" (skipped {len(skipped)} file(s) with other extensions)" if skipped else ""
        raise UserError(
            f"no usable data files in {', '.join(map(str, paths))}{note}: "
            f"supported are {_SUPPORTED_DESCRIPTION}"
        )
    return unique


def _field_list(names: Iterable[str], limit: int = 20) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "") if names else "none"


def _missing_field(where: str, text_field: str, fields: Iterable[str]) -> UserError:
    return UserError(
        f"{where} has no field '{text_field}'; pass --text-field NAME (fields: {_field_list(fields)})"
    )


def _as_text(value: Any, where: str, text_field: str) -> str | None:
    """Return the document text, or None for a document to skip (null, empty or whitespace-only)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(
            f"{where} field '{text_field}' holds a {type(value).__name__}, not text; "
            "pass --text-field NAME of a text field"
        )
    return value if value.strip() else None


def _record_text(obj: Any, where: str, text_field: str, hint: str) -> str | None:
    """The text of one JSON record, or a UserError naming what is wrong with it."""
    if not isinstance(obj, dict):
        raise UserError(f"{where} is a JSON {type(obj).__name__}, not an object; {hint}")
    if text_field not in obj:
        raise _missing_field(where, text_field, obj.keys())
    return _as_text(obj[text_field], where, text_field)


def _not_utf8(path: Path, err: UnicodeDecodeError) -> UserError:
    return UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8")


def _iter_text_file(path: Path) -> Iterator[str]:
    try:
        # utf-8-sig drops a byte-order mark, which editors on Windows like to add.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err
    if text.strip():
        yield text


def _iter_json_lines(path: Path, text_field: str, hint: str) -> Iterator[str]:
    """One JSON object per line; blank lines are allowed. Reads line by line, so memory stays flat."""
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{where} is not valid JSON ({err.msg}); {hint}") from err
                text = _record_text(obj, where, text_field, hint)
                if text is not None:
                    yield text
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _iter_json_file(path: Path, text_field: str) -> Iterator[str]:
    """A .json file: a JSON list of objects (loaded whole), or JSON lines under a .json name (streamed)."""
    hint = "a .json file must hold a JSON list of objects, or one JSON object per line"
    try:
        with path.open(encoding="utf-8-sig") as handle:
            head = handle.read(4096).lstrip()
            while not head:  # skip leading whitespace longer than one read
                chunk = handle.read(4096)
                if not chunk:
                    return  # empty file: no documents
                head = chunk.lstrip()
            if head[0] != "[":
                is_list = False
            else:
                is_list = True
                handle.seek(0)
                try:
                    rows = json.load(handle)
                except json.JSONDecodeError as err:
                    raise UserError(
                        f"{path} is not valid JSON ({err.msg} at line {err.lineno}); {hint}"
                    ) from err
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err

    if not is_list:
        yield from _iter_json_lines(path, text_field, hint)
        return
    for number, obj in enumerate(rows):
        where = f"{path} item {number}"
        text = _record_text(obj, where, text_field, hint)
        if text is not None:
            yield text


def _iter_parquet(path: Path, text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(
            f"{path} is not a readable parquet file ({err}); check or re-export the file"
        ) from err
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise _missing_field(str(path), text_field, names)
    # Record batches of one column: memory stays bounded by the batch, not the file.
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            text = _as_text(value, str(path), text_field)
            if text is not None:
                yield text


def _iter_saved_dataset(path: Path, text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    import datasets  # imported lazily: it is slow to import and only needed for this format

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several unrelated types for a damaged folder
        raise UserError(
            f"{path} could not be loaded with datasets.load_from_disk ({type(err).__name__}: {err}); "
            "re-save it with save_to_disk"
        ) from err
    where = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            return
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
        where = f"{path} (split '{split}')"
    yield from _iter_dataset_text(loaded, where, text_field, batch_rows)


def _iter_dataset_text(dataset: Any, where: str, text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    """The non-blank texts of column `text_field` of a `datasets.Dataset`."""
    if text_field not in dataset.column_names:
        raise _missing_field(where, text_field, dataset.column_names)
    # Arrow files are memory-mapped by datasets; iterating in batches keeps Python objects bounded.
    for batch in dataset.select_columns([text_field]).iter(batch_size=batch_rows):
        for value in batch[text_field]:
            text = _as_text(value, where, text_field)
            if text is not None:
                yield text


def iter_documents(paths: list[DataSource], text_field: str = "text") -> Iterator[str]:
    """Yield the documents of `paths` (as returned by `resolve_data_files`) one at a time, in order.

    * .txt / .md / .text: the whole file is one document (read one file at a time);
    * .jsonl: one JSON object per line, document = obj[text_field];
    * .json: a JSON list of objects (loaded whole), or JSON lines under a .json name;
    * .parquet: column `text_field`, read in record batches;
    * a save_to_disk folder: column `text_field` of the dataset (of the "train" split of a
      DatasetDict, or its first split when there is no "train");
    * a `HubDataset`: column `text_field` of its split (loaded now if it was not yet).

    Null, empty and whitespace-only documents are skipped. Files are opened lazily, so an error in a
    later file is raised only when iteration reaches it.

    Raises:
        UserError: a record lacks `text_field` (the message lists the fields present), the field is not
            text, or a file cannot be parsed.
    """
    for path in paths:
        if isinstance(path, HubDataset):
            loaded = path.dataset if path.dataset is not None else _load_hub_dataset(path).dataset
            yield from _iter_dataset_text(loaded, f"hub dataset {path}", text_field)
            continue
        suffix = path.suffix.lower()
        if path.is_dir():
            yield from _iter_saved_dataset(path, text_field)
        elif suffix in TEXT_SUFFIXES:
            yield from _iter_text_file(path)
        elif suffix in JSONL_SUFFIXES:
            yield from _iter_json_lines(
                path, text_field, "each line of a .jsonl file must be one JSON object"
            )
        elif suffix in JSON_SUFFIXES:
            yield from _iter_json_file(path, text_field)
        elif suffix in PARQUET_SUFFIXES:
            yield from _iter_parquet(path, text_field)
        else:
            raise UserError(
                f"data file {path} has an unsupported format '{suffix}': "
                f"supported are {_SUPPORTED_DESCRIPTION}"
            )


# --------------------------------------------------------------------------------------------------
# Tokenising, packing and caching
# --------------------------------------------------------------------------------------------------


def _describe(paths: list[str]) -> str:
    """Name the user's data in messages: the path itself, or a short list."""
    if len(paths) == 1:
        return paths[0]
    shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
    return f"the data ({len(paths)} paths: {shown})"


def _file_fingerprints(files: list[DataSource]) -> list[list[Any]]:
    """(path, size, mtime_ns) of every data file; a save_to_disk folder contributes each file inside it.

    A hub dataset contributes ("hub", its id, config, split, the loaded split's `datasets` fingerprint).
    """
    rows: list[list[Any]] = []
    for path in files:
        if isinstance(path, HubDataset):
            rows.append(["hub", path.repo, path.config, path.split, getattr(path.dataset, "_fingerprint", None)])
            continue
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for member in members:
            stat = member.stat()
            rows.append([str(member), stat.st_size, stat.st_mtime_ns])
    return rows


# A short plain text: encoded with and without special tokens, it shows what a tokenizer puts around a text.
_PROBE_TEXT = "Hello world"


@dataclass(frozen=True)
class DocumentTemplate:
    """The token ids put around every document's text tokens, so the teacher sees documents as in training.

    Attributes:
        prefix: what the tokenizer itself puts before a text with ``add_special_tokens=True``: its BOS
            where it adds one (Llama 3, Mistral), nothing where it does not (Qwen).
        suffix: what it puts after the text, followed by EOS unless that already ends with EOS, so a
            document always ends with exactly one EOS, which separates it from the next.

    The text tokens themselves are encoded with ``add_special_tokens=False`` and the ids added around
    them, which is what ``add_special_tokens=True`` gives for one text, at the speed of batch encoding.
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    def frame(self, text_ids: list[int]) -> Iterator[int]:
        """The ids of one document: prefix + text + suffix."""
        return itertools.chain(self.prefix, text_ids, self.suffix)


def _split_around(with_special: list[int], plain: list[int]) -> tuple[list[int], list[int]] | None:
    """(before, after) with ``with_special == before + plain + after``, or None if `plain` is not in it."""
    n = len(plain)
    for i in range(len(with_special) - n + 1):
        if with_special[i : i + n] == plain:
            return with_special[:i], with_special[i + n :]
    return None


def detect_document_template(tokenizer: Any, eos_id: int) -> DocumentTemplate:
    """Find the special tokens `tokenizer` puts around a text, by encoding a probe with and without them.

    Detected, not looked up by model name: the tokenizer's own post-processor (or, for a slow tokenizer,
    its `build_inputs_with_special_tokens`) is what the teacher was trained with. Uses `tokenizer.encode`,
    once per build.

    Raises:
        UserError: the tokenizer's special tokens do not just wrap the text (the probe's plain encoding is
            not a contiguous part of its encoding with special tokens), so no template can be told.
    """
    plain = list(tokenizer.encode(_PROBE_TEXT, add_special_tokens=False))
    with_special = list(tokenizer.encode(_PROBE_TEXT, add_special_tokens=True))
    parts = _split_around(with_special, plain) if plain else None
    if parts is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"cannot tell which special tokens tokenizer {name} adds around a text: {_PROBE_TEXT!r} encodes to "
            f"{plain} without special tokens and to {with_special} with them; use a tokenizer whose special "
            "tokens only wrap the text"
        )
    prefix, suffix = parts
    if not suffix or suffix[-1] != eos_id:
        suffix = suffix + [eos_id]
    return DocumentTemplate(prefix=tuple(int(i) for i in prefix), suffix=tuple(int(i) for i in suffix))


def _tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's output: name, vocabulary sizes, EOS id and its full serialised form."""
    backend_hash = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        backend_hash = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    elif hasattr(tokenizer, "get_vocab"):  # slow tokenizers: the vocabulary is the best proxy we have
        vocab = sorted(tokenizer.get_vocab().items())
        backend_hash = hashlib.sha256(json.dumps(vocab).encode("utf-8")).hexdigest()
    try:
        total = len(tokenizer)
    except TypeError:
        total = None
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": getattr(tokenizer, "vocab_size", None),
        "len": total,
        "eos_token_id": tokenizer.eos_token_id,
        "backend_sha256": backend_hash,
    }


def _cache_key(files: list[DataSource], tokenizer: Any, text_field: str, template: DocumentTemplate) -> str:
    """Hash of everything the token stream depends on.

    The template is in the key as well as the tokenizer's serialised form: a fast tokenizer's post-processor
    is part of that form, but a slow tokenizer is fingerprinted by its vocabulary only.
    """
    material = {
        "format": _CACHE_FORMAT,
        "files": _file_fingerprints(files),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "template": {"prefix": list(template.prefix), "suffix": list(template.suffix)},
        "text_field": text_field,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"tokens-{key}.int32.bin", cache_dir / f"tokens-{key}.doc_starts.npy"


def _load_cache(tokens_path: Path, docs_path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Open a committed cache, or return None when it is missing or damaged (it is then rebuilt)."""
    # The token file is renamed into place last, so its presence means the doc_starts file is complete.
    if not tokens_path.is_file() or not docs_path.is_file():
        return None
    size = tokens_path.stat().st_size
    try:
        doc_starts = np.load(docs_path)
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable token cache %s (%s); rebuilding it", docs_path, err)
        return None
    valid = (
        size > 0
        and size % 4 == 0
        and doc_starts.ndim == 1
        and len(doc_starts) > 0
        and doc_starts[0] == 0
        and doc_starts[-1] < size // 4
    )
    if not valid:
        logger.warning("ignoring damaged token cache %s; rebuilding it", tokens_path)
        return None
    tokens = np.memmap(tokens_path, dtype=np.int32, mode="r")
    return tokens, doc_starts.astype(np.int64, copy=False)


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def _tokenize_stream(
    documents: Iterator[str], tokenizer: Any, template: DocumentTemplate, batch_size: int, sink: Any
) -> tuple[np.ndarray, int]:
    """Tokenise documents batch by batch, passing each packed chunk (int32) to `sink`.

    Each document's text is encoded with ``add_special_tokens=False`` (batch encoding, fast) and framed by
    `template` (prefix + text + suffix ending with EOS). Returns (doc_starts, total number of tokens).
    """
    start_chunks: list[np.ndarray] = []
    total = 0
    extra = len(template.prefix) + len(template.suffix)
    for texts in _batched(documents, batch_size):
        # verbose=False: the "sequence longer than model_max_length" warning is irrelevant when packing.
        batch_ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        # A document that tokenises to nothing would be only special tokens: no signal, so it is dropped.
        batch_ids = [ids for ids in batch_ids if len(ids)]
        if not batch_ids:
            continue
        lengths = np.fromiter((len(ids) + extra for ids in batch_ids), dtype=np.int64, count=len(batch_ids))
        count = int(lengths.sum())
        flat = np.fromiter(
            itertools.chain.from_iterable(template.frame(ids) for ids in batch_ids), dtype=np.int32, count=count
        )
        # Start of each document = running total before it.
        start_chunks.append(total + np.concatenate(([0], np.cumsum(lengths[:-1]))))
        sink(flat)
        total += count
    doc_starts = np.concatenate(start_chunks) if start_chunks else np.zeros(0, dtype=np.int64)
    return doc_starts.astype(np.int64, copy=False), total


def _check_stream(
    doc_starts: np.ndarray, total: int, seq_len: int, paths: Sequence[str | DataSource], text_field: str
) -> None:
    names = [str(p) for p in paths]  # resolved sources (Path, HubDataset) are named by their text
    if len(doc_starts) == 0:
        raise UserError(
            f"no text found in {_describe(names)}: every document is empty or blank "
            f"(text field '{text_field}'); add text or pass --text-field NAME"
        )
    if total < seq_len:
        raise UserError(
            f"{_describe(names)} has {total} tokens, fewer than one training sequence of {seq_len}; "
            "add data or lower --seq-len"
        )


def build_packed_dataset(
    paths: Sequence[str | DataSource],
    tokenizer: Any,
    seq_len: int,
    cache_dir: Path | None = None,
    text_field: str = "text",
    batch_size: int = 256,
) -> PackedDataset:
    """Tokenise and pack the documents found under `paths` into a `PackedDataset`.

    Documents are tokenised `batch_size` at a time with
    ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` and each is framed as the tokenizer frames a
    text: the special tokens it adds before a text (its BOS, if any), the text tokens, the special tokens it
    adds after a text and `tokenizer.eos_token_id` unless those already end with it (see
    `detect_document_template`, run once here). Documents whose text produces no tokens are dropped.

    With `cache_dir`, the token stream is stored there under a name derived from a hash of the resolved
    data files (with their sizes and modification times; for a hub dataset its id, config, split and
    `datasets` fingerprint), the tokenizer (name, vocabulary size, EOS id and a hash of its serialised
    backend), the detected document template and `text_field`. It is written in chunks to a temporary file
    and renamed into place only when complete, so an interrupted or failed run leaves no partial cache
    (and removes a cache folder it created); a later call with the same inputs memory-maps the file
    without tokenising again. Without `cache_dir` the stream is kept in memory.

    Raises:
        UserError: bad paths or formats (see `resolve_data_files` / `iter_documents`), a tokenizer
            without EOS token or with special tokens that do not just wrap a text, no text at all, fewer
            than `seq_len` tokens, or a `cache_dir` that is a file. All are raised before a cache file is
            committed.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise UserError(f"sequence length must be an integer >= 2, got {seq_len!r}; pass --seq-len N")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = resolve_data_files(paths)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"tokenizer {name} has no EOS token, which is needed to separate packed documents; "
            "use a tokenizer whose config sets eos_token"
        )
    eos_id = int(eos_id)
    template = detect_document_template(tokenizer, eos_id)
    logger.info("documents are framed as %s + text + %s", list(template.prefix), list(template.suffix))

    if cache_dir is None:
        chunks: list[np.ndarray] = []
        doc_starts, total = _tokenize_stream(
            iter_documents(files, text_field), tokenizer, template, batch_size, chunks.append
        )
        _check_stream(doc_starts, total, seq_len, paths, text_field)
        tokens = np.concatenate(chunks)
        logger.info("packed %d documents into %d tokens", len(doc_starts), total)
        return PackedDataset(tokens=tokens, doc_starts=doc_starts, seq_len=seq_len)

    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"cache path {cache_dir} is a file, not a folder; pass a folder for the token cache")
    tokens_path, docs_path = _cache_paths(cache_dir, _cache_key(files, tokenizer, text_field, template))
    cached = _load_cache(tokens_path, docs_path)
    if cached is not None:
        tokens, doc_starts = cached
        _check_stream(doc_starts, len(tokens), seq_len, paths, text_field)
        logger.info("reusing token cache %s (%d tokens)", tokens_path, len(tokens))
        return PackedDataset(tokens=tokens, doc_starts=doc_starts, seq_len=seq_len)

    doc_starts, total = _write_cache(tokens_path, docs_path, lambda sink: _tokenize_stream(
        iter_documents(files, text_field), tokenizer, template, batch_size, sink),
        lambda starts, n: _check_stream(starts, n, seq_len, paths, text_field))
    logger.info("packed %d documents into %d tokens; cached at %s", len(doc_starts), total, tokens_path)
    tokens = np.memmap(tokens_path, dtype=np.int32, mode="r")
    return PackedDataset(tokens=tokens, doc_starts=doc_starts, seq_len=seq_len)


def _write_cache(tokens_path: Path, docs_path: Path, tokenize, check) -> tuple[np.ndarray, int]:
    """Write the token stream (`tokenize(sink)` -> (doc_starts, total)) and its document starts to the cache.

    Both files are written under unique temporary names and renamed into place only when complete (several
    ranks may build the same cache at once; the last rename wins with identical content); on any failure,
    `check`'s included, the temporary files and the cache folders created here are removed again."""
    created: list[Path] = []  # innermost first
    parent = tokens_path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_tokens = tokens_path.with_name(tokens_path.name + suffix)
    tmp_docs = docs_path.with_name(docs_path.name + suffix)
    try:
        with open(tmp_tokens, "wb") as out:
            doc_starts, total = tokenize(lambda chunk: out.write(chunk.tobytes()))
            check(doc_starts, total)
            out.flush()
            os.fsync(out.fileno())
        with open(tmp_docs, "wb") as out:
            np.save(out, doc_starts)
            out.flush()
            os.fsync(out.fileno())
        # doc_starts first, tokens last: the token file's presence marks a complete cache.
        os.replace(tmp_docs, docs_path)
        os.replace(tmp_tokens, tokens_path)
    except BaseException:
        for tmp in (tmp_tokens, tmp_docs):
            tmp.unlink(missing_ok=True)
        for folder in created:  # rmdir refuses folders something else wrote into
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return doc_starts, total


def split_holdout(ds: PackedDataset, fraction: float) -> tuple[PackedDataset, PackedDataset]:
    """Split `ds` into (train, holdout): the holdout is the last ceil(fraction * n) sequences.

    At least one sequence is held out when `fraction` > 0 and at least one is kept for training;
    `fraction` == 0 gives an empty holdout. Both parts are views of `ds.tokens` cut at a sequence
    boundary (no copy). The holdout's `doc_starts` begins with the real (possibly negative) start of
    the document it opens in, so its position ids are the same as in `ds`; sequence i of the holdout
    equals sequence (len(train) + i) of `ds`.

    Raises:
        UserError: `fraction` outside [0, 1), or fewer than 2 sequences when `fraction` > 0.
    """
    if not (0.0 <= fraction < 1.0):  # also rejects NaN
        raise UserError(f"holdout fraction must be in [0, 1), got {fraction}; pass a fraction such as 0.01")
    n = len(ds)
    if fraction == 0:
        n_hold = 0
    else:
        if n < 2:
            raise UserError(
                f"the data has {n} sequence(s) of {ds.seq_len} tokens, too few to hold out a validation "
                "split; add data, lower --seq-len, or set the holdout fraction to 0"
            )
        # The small epsilon keeps float noise (0.7 * 10 == 7.000000000000001) from adding a sequence.
        n_hold = min(max(1, math.ceil(fraction * n - 1e-9)), n - 1)
    cut = (n - n_hold) * ds.seq_len

    train_docs = ds.doc_starts[ds.doc_starts < cut]
    # The document containing offset `cut` is the last one starting at or before it.
    first = int(np.searchsorted(ds.doc_starts, cut, side="right")) - 1
    hold_docs = ds.doc_starts[max(first, 0) :] - cut
    train = PackedDataset(tokens=ds.tokens[:cut], doc_starts=train_docs, seq_len=ds.seq_len)
    holdout = PackedDataset(tokens=ds.tokens[cut:], doc_starts=hold_docs, seq_len=ds.seq_len)
    return train, holdout


# --------------------------------------------------------------------------------------------------
# Sampling and batching
# --------------------------------------------------------------------------------------------------


class SequenceSampler:
    """Deterministic, resumable order over sequence indices, sharded across data-parallel ranks.

    The global order is an endless stream: the permutation of epoch 0, then of epoch 1, and so on, where
    epoch e's permutation comes from ``numpy.random.default_rng((seed, e))`` (or is 0..n-1 when
    `shuffle` is False). It does not depend on the world size or the batch size.

    Sharding is by global batch, contiguously: each call ``next_indices(b)`` consumes the next
    ``b * world_size`` indices of the stream, and rank r gets the slice ``[r*b, (r+1)*b)`` of them. So
    rank r's k-th batch of size b is exactly elements ``[k*b*W + r*b, k*b*W + (r+1)*b)`` of the order a
    single process (world_size=1) gets when it takes batches of ``b*W``: a multi-GPU run sees the same
    global batches as a single-GPU run with the same global batch size. (Striding by rank would not
    have this property.) All ranks must therefore call `next_indices` with the same n, as they do when
    they step together.

    A global batch may cross an epoch boundary; it then continues into the next epoch's permutation,
    so no indices are dropped and ranks always get equal counts.

    The state (`state_dict`) is the global stream position, identical on every rank; restoring it
    gives exactly the indices that would have followed without the interruption, also with another
    world size as long as the global batch size is unchanged.
    """

    def __init__(
        self, num_sequences: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if num_sequences < 1:
            raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}; pass --seed N with N >= 0")
        self.num_sequences = int(num_sequences)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0  # offset within the current epoch's order of the next global batch
        # The current epoch's permutation (and the next one's, near a boundary) are reused across calls.
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(self.num_sequences)
            else:
                order = np.arange(self.num_sequences)
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return order

    def _take(self, start: int, count: int) -> list[int]:
        """Elements [start, start + count) of the endless global stream."""
        out: list[int] = []
        epoch, offset = divmod(start, self.num_sequences)
        while count > 0:
            step = min(count, self.num_sequences - offset)
            out.extend(self._order(epoch)[offset : offset + step].tolist())
            count -= step
            epoch, offset = epoch + 1, 0
        return out

    def next_indices(self, n: int) -> list[int]:
        """This rank's next `n` sequence indices (its slice of the next global batch of n * world_size)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        here = self.epoch * self.num_sequences + self.position
        indices = self._take(here + self.rank * n, n)
        self.epoch, self.position = divmod(here + n * self.world_size, self.num_sequences)
        return indices

    def state_dict(self) -> dict[str, Any]:
        """Plain-int (JSON-serialisable) state; the same on every rank."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_sequences": self.num_sequences,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `state_dict`).

        Raises:
            UserError: the state was saved for a different number of sequences, seed or shuffle setting,
                i.e. the run being resumed used other data or settings.
        """
        expected = {"num_sequences": self.num_sequences, "seed": self.seed, "shuffle": self.shuffle}
        for key, mine in expected.items():
            if key in state and state[key] != mine:
                raise UserError(
                    f"the resumed sampler state has {key}={state[key]} but this run has {key}={mine}; "
                    "resume with the same data, --seq-len and seed as the saved run"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_sequences:
            raise ValueError(f"invalid sampler state: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the (T,) tensors of `items` (from `PackedDataset.get`) into (B, T) tensors, key by key."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = items[0].keys()
    if any(item.keys() != keys for item in items):
        raise ValueError("all items of a batch must have the same keys")
    return {key: torch.stack([item[key] for item in items]) for key in keys}
