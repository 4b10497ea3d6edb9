"""`--data` -> what the trainer reads: a packed dataset, a weighted `Mixture` of them, or a `TokenStream`.

A source's stream is stored once (`lrc.data.packed`) under a key of everything it depends on: the files'
paths, sizes and mtimes (contents are not hashed, which would cost a full read, so an edit keeping both is
missed), a hub split's `datasets` fingerprint, the tokenizer's serialised form, the document template, the
text field, the chat template and --train-on; not `seq_len`. Stale entries are never deleted. Under torchrun
LOCAL_RANK 0 builds a missing entry while the machine's other processes wait; then all memory-map it.
`lrc prepare` writes the same files and ``lrc-tokens.json`` into a folder that `--data` takes as a source.

Every store has a manifest (``tokens-KEY.json``; ``lrc-tokens.json`` in a prepared folder) of what it was made
with (tokenizer fingerprint, vocabulary size, BOS/EOS framing, chat template, sources; `lrc prepare`'s
--seq-len) and each file's size and SHA-256, checked at every start-up (LOCAL_RANK 0, about 1 s per GB of
tokens): a damaged cache entry is tokenised again, a damaged or mismatched prepared folder is refused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrc.data import sources as src
from lrc.data import tokenise as tk
from lrc.data.chat import ChatRenderer, read_template
from lrc.data.packed import DamagedStore, PackedDataset, open_store, read_manifest, token_dtype, write_store
from lrc.data.sampler import Batches, Mixture, MixtureSampler, SequenceSampler
from lrc.data.stream import TokenStream
from lrc.errors import UserError

logger = logging.getLogger(__name__)
CACHE_FORMAT = "lrc-packed-tokens-v4"  # bump when the layout or recipe changes; v4: narrow dtype, manifest


def _describe(paths) -> str:
    names = [str(p) for p in paths]
    return names[0] if len(names) == 1 else f"the data ({len(names)} paths: {', '.join(names[:3])}, ...)"


def cache_key(files, tokenizer: Any, text_field: str, template: tk.DocumentTemplate, chat: dict | None = None) -> str:
    """The template is in the key by itself: a slow tokenizer's fingerprint does not show its special tokens."""
    material = {"format": CACHE_FORMAT, "files": src.file_fingerprints(files), "text_field": text_field,
                "tokenizer": tk.tokenizer_fingerprint(tokenizer), "chat": chat or {},
                "template": {"prefix": list(template.prefix), "suffix": list(template.suffix)}}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def vocab_size(tokenizer: Any) -> int:
    """Ids the tokenizer can produce: its base vocabulary and added tokens."""
    return max(len(tokenizer) if hasattr(tokenizer, "__len__") else 0, int(getattr(tokenizer, "vocab_size", 0) or 0))


def once_per_machine(build):
    """`build(True)` on LOCAL_RANK 0 first while the others wait, then `build(False)` on the others (which find
    its result on disk, already checked). A failure there stops every process instead of leaving them waiting."""
    import torch.distributed as dist  # only under torchrun (fsdp, checkpoints)

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build(True)
    first, error, result = int(os.environ.get("LOCAL_RANK", "0")) == 0, None, None
    if first:
        try:
            result = build(True)
        except Exception as e:  # raised below, after telling the others
            error = e
    # The barrier: a gloo group of its own with a day's timeout, since tokenising a large corpus outlasts the
    # training group's (NCCL: 10 minutes).
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    failed = torch.tensor([float(error is not None)])
    dist.all_reduce(failed, group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    if failed.item() > 0:
        raise UserError("preparing the data failed in another process (its error is printed there); fix it and "
                        "start again")
    return result if first else build(False)


class Recipe:
    """How sources become tokens: tokenizer, document template, chat rendering, and the cache key."""

    def __init__(self, files, tokenizer, text_field="text", chat_template: str | None = None, train_on="all"):
        self.files, self.tokenizer, self.text_field, self.chat_file, self.train_on = \
            files, tokenizer, text_field, chat_template, train_on
        self.eos = tk.eos_id_of(tokenizer)
        self.template = tk.detect_document_template(tokenizer, self.eos)
        own = read_template(tokenizer, chat_template) if chat_template or getattr(tokenizer, "chat_template", None) \
            else ""
        self.chat = {"template": hashlib.sha256(own.encode()).hexdigest(), "train_on": train_on}
        self.key = cache_key(files, tokenizer, text_field, self.template, self.chat)
        self.vocab = vocab_size(tokenizer)
        self.dtype = token_dtype(self.vocab)
        self.map_files: list[str] = []  # datasets' Arrow copies of the ids, dropped once the store holds them

    def record(self) -> dict[str, Any]:
        """What a store records of how it was made (compared again when a prepared folder is opened)."""
        return {"key": self.key, "tokenizer": tk.tokenizer_fingerprint(self.tokenizer), "vocab_size": self.vocab,
                "framing": {"prefix": list(self.template.prefix), "suffix": list(self.template.suffix)},
                "chat": self.chat, "text_field": self.text_field, "sources": [str(f) for f in self.files]}

    def drop_map_cache(self) -> None:
        """Each id is stored once: the map's Arrow files are deleted after the store is complete (until then they
        let an interrupted build resume without tokenising again)."""
        for name in self.map_files:
            Path(name).unlink(missing_ok=True)
        self.map_files.clear()

    def function(self, parts: list[Any], keep_rows: bool = False) -> tk.Tokenise:
        """The map function; `keep_rows`: one output row per input row (a stream counts its documents)."""
        chat = any(src.CHAT in src.columns(p) for p in parts)
        return tk.Tokenise(self.tokenizer, self.template, ChatRenderer(
            self.tokenizer, read_template(self.tokenizer, self.chat_file), self.train_on, self.eos) if chat else None,
            keep_rows=keep_rows)

    def fill(self, batch_size: int = 256, num_proc: int = 1, progress: bool = False):
        """``fill(write_tokens, write_mask) -> doc_starts``: tokenise and pack, chunk by chunk."""
        import datasets  # heavy (pandas, pyarrow): only when data is read

        def fill(write_tokens, write_mask) -> np.ndarray:
            loaded = src.load_parts(self.files, self.text_field)
            parts, origins = [p for p, _ in loaded], [o for _, o in loaded]
            for part, origin in loaded:
                _report_missing_text(part, origin, self.text_field)
            fn = self.function(parts)
            features = datasets.Features({tk.IDS: datasets.List(datasets.Value("int32")), **(
                {tk.MASK: datasets.List(datasets.Value("uint8"))} if fn.masked else {})})
            starts, total = [np.zeros(0, np.int64)], 0
            for out in tk.tokenise(parts, fn, self.key, batch_size=batch_size, num_proc=num_proc,
                                   progress=progress, features=features, origins=origins):
                self.map_files += [f["filename"] for f in out.cache_files]
                for table in out.with_format("arrow").iter(batch_size=1024):  # rows: memory stays flat
                    ids = table.column(tk.IDS).combine_chunks()
                    lengths = ids.value_lengths().to_numpy().astype(np.int64)
                    write_tokens(ids.flatten().to_numpy().astype(np.int32, copy=False))
                    if fn.masked:
                        write_mask(table.column(tk.MASK).combine_chunks().flatten().to_numpy().astype(np.uint8))
                    starts.append(total + np.cumsum(lengths) - lengths)
                    total += int(lengths.sum())
            return np.concatenate(starts)

        return fill


def _report_missing_text(part: Any, origin: src.Origin, field: str) -> None:
    """Rows without text (null, or no such field: `datasets` reads both as null) are skipped like blank ones;
    one warning says how many and names the first."""
    import pyarrow.compute as pc  # heavy: only when data is read

    if src.TEXT not in part.column_names or getattr(part, "_indices", None) is not None:
        return
    column = part.data.column(src.TEXT)
    if column.null_count:
        first = pc.index(pc.is_null(column), True).as_py()
        logger.warning("%d row(s) of %s have no text (null, or no '%s' field) and are skipped; the first: %s",
                       column.null_count, origin.where, field, origin.row(first))


def _checker(paths, text_field: str, seq_len: int):
    def check(starts: np.ndarray, total: int) -> None:
        if len(starts) == 0:
            raise UserError(f"no text found in {_describe(paths)}: every document is empty or blank (text field "
                            f"'{text_field}'); add text or pass --text-field NAME")
        if total < seq_len:
            raise UserError(f"{_describe(paths)} has {total} tokens, fewer than one training sequence of {seq_len}; "
                            "add data or lower --seq-len")
    return check


def _stored(folder: Path, stem: str, manifest: Path, seq_len: int, recipe: Recipe, fill, check,
            verify: bool = True, record: dict | None = None) -> PackedDataset:
    """The store memory-mapped, written first when missing or damaged (a cache is rebuilt, never trusted);
    checked either way (seq_len is not in the cache key)."""
    try:
        ds = open_store(folder, read_manifest(manifest, CACHE_FORMAT), seq_len, verify)
    except DamagedStore as why:
        if manifest.exists():
            logger.warning("token cache %s is damaged (%s); tokenising again", folder / stem, why)
        write_store(folder, stem, fill, check, manifest, CACHE_FORMAT, {**recipe.record(), **(record or {})},
                    recipe.dtype)
        recipe.drop_map_cache()
        ds = open_store(folder, read_manifest(manifest, CACHE_FORMAT), seq_len, verify=False)  # just written
    check(ds.doc_starts, len(ds.tokens))
    return ds


def _format_of(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _disagreement(manifest: dict, tokenizer: Any) -> str | None:
    """What of the tokenizer a prepared folder records differs from `tokenizer` (None: nothing)."""
    template = tk.detect_document_template(tokenizer, tk.eos_id_of(tokenizer))
    mine, theirs = tk.tokenizer_fingerprint(tokenizer), manifest.get("tokenizer", {})
    framing = manifest.get("framing", {})
    if manifest.get("vocab_size") != vocab_size(tokenizer):
        return f"vocabulary size ({manifest.get('vocab_size')} vs {vocab_size(tokenizer)})"
    if [framing.get("prefix"), framing.get("suffix")] != [list(template.prefix), list(template.suffix)]:
        return (f"document framing (BOS/EOS: {framing.get('prefix')} + text + {framing.get('suffix')} vs "
                f"{list(template.prefix)} + text + {list(template.suffix)})")
    if {**mine, "name_or_path": 0} != {**theirs, "name_or_path": 0}:
        return "vocabulary or merges (a different fingerprint)"
    return None


def open_prepared(folder: Path, tokenizer: Any, seq_len: int, verify: bool = True) -> PackedDataset:
    """A folder from `lrc prepare`, refused (one line) when it was made with another tokenizer, vocabulary size or
    document framing, or in an older format, or when a file is missing, cut short or changed. Its `seq_len` is
    recorded but not compared: the stored stream does not depend on it, any --seq-len cuts it correctly."""
    marker = folder / src.PREPARED_MARKER
    try:
        manifest = read_manifest(marker, CACHE_FORMAT)
    except DamagedStore as why:
        found = _format_of(marker)
        if found and found != CACHE_FORMAT:
            raise UserError(f"{folder} was written by an older lrc (format {found}, this one reads {CACHE_FORMAT}); "
                            "run `lrc prepare` again into a new --out") from None
        raise UserError(f"{folder} is damaged ({why}); run `lrc prepare` again") from None
    if (what := _disagreement(manifest, tokenizer)) is not None:
        theirs = manifest.get("tokenizer", {}).get("name_or_path") or "another tokenizer"
        raise UserError(f"{folder} was prepared with {theirs}, whose tokenizer differs from the teacher's "
                        f"({tk.tokenizer_name(tokenizer)}) in its {what}; run `lrc prepare` again with this --teacher")
    try:
        ds = open_store(folder, manifest, seq_len, verify)
    except DamagedStore as why:
        raise UserError(f"{folder} is damaged: {why}; run `lrc prepare` again") from None
    _checker([folder], "text", seq_len)(ds.doc_starts, len(ds.tokens))
    return ds


def build_packed_dataset(paths, tokenizer: Any, seq_len: int, cache_dir: Path | None = None, text_field: str = "text",
                         batch_size: int = 256, *, num_proc: int = 1, chat_template: str | None = None,
                         train_on: str = "all", progress: bool = False) -> PackedDataset:
    """The documents under `paths` tokenised and packed; stored in `cache_dir` and memory-mapped (without it: in
    memory). A folder from `lrc prepare` is opened as it is. Every UserError (bad paths, formats or
    tokenizer, no text, fewer than `seq_len` tokens, a `cache_dir` that is a file) comes before a commit."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise UserError(f"sequence length must be an integer >= 2, got {seq_len!r}; pass --seq-len N")
    files = src.resolve_data_files(list(paths))
    if len(files) == 1 and isinstance(files[0], Path) and (files[0] / src.PREPARED_MARKER).is_file():
        return once_per_machine(lambda first: open_prepared(files[0], tokenizer, seq_len, verify=first))
    recipe = Recipe(files, tokenizer, text_field, chat_template, train_on)
    logger.info("documents are framed as %s + text + %s", list(recipe.template.prefix), list(recipe.template.suffix))
    fill, check = recipe.fill(batch_size, num_proc, progress), _checker(paths, text_field, seq_len)
    if cache_dir is None:
        tokens: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        starts = fill(tokens.append, masks.append)
        recipe.drop_map_cache()
        check(starts, sum(len(t) for t in tokens))
        return PackedDataset(np.concatenate(tokens).astype(recipe.dtype), starts, seq_len,
                             np.concatenate(masks) if masks else None)
    folder, stem = Path(cache_dir), f"tokens-{recipe.key}"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cache path {folder} is a file, not a folder; pass a folder for the token cache")
    ds = once_per_machine(lambda first: _stored(folder, stem, folder / f"{stem}.json", seq_len, recipe, fill, check,
                                                verify=first))
    logger.info("data %s: %s documents, %s tokens (cache %s)", _describe(paths), f"{len(ds.doc_starts):,}",
                f"{len(ds.tokens):,}", folder / stem)
    return ds


def _interrupted_prepare(out: Path) -> bool:
    """Whether everything in `out` was written by a `lrc prepare` that did not finish (its files and temporaries)."""
    return all(p.is_file() and p.name.startswith(("tokens.", src.PREPARED_MARKER)) for p in out.iterdir())


def prepare_tokens(paths, tokenizer: Any, out: Path, seq_len: int, text_field: str = "text", num_proc: int = 1,
                   chat_template: str | None = None, train_on: str = "all", progress: bool = True) -> PackedDataset:
    """`lrc prepare`: the packed stream of `paths` into the new folder `out`, with the manifest ``lrc-tokens.json``
    written last. The same command again finishes what a killed one left (its files are replaced) and leaves a
    finished folder of the same recipe as it is."""
    recipe = Recipe(src.resolve_data_files(list(paths)), tokenizer, text_field, chat_template, train_on)
    marker = out / src.PREPARED_MARKER
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose a new --out for the prepared tokens")
    if marker.is_file():
        if _format_of(marker) == CACHE_FORMAT and json.loads(marker.read_text()).get("key") == recipe.key:
            logger.info("%s already holds these tokens (the same data, tokenizer and options); checking it", out)
            return open_prepared(out, tokenizer, seq_len)
        raise UserError(f"{out} already holds tokens prepared from other data, options or lrc version; choose a new "
                        "--out for the prepared tokens")
    if out.exists() and any(out.iterdir()):
        if not _interrupted_prepare(out):
            raise UserError(f"{out} exists and is not empty; choose a new --out for the prepared tokens")
        logger.info("%s holds an interrupted `lrc prepare`; writing it again", out)
        for leftover in out.iterdir():
            leftover.unlink()
    return _stored(out, "tokens", marker, seq_len, recipe, recipe.fill(256, num_proc, progress),
                   _checker(paths, text_field, seq_len), record={"seq_len": seq_len})


def build_training_data(items: list[str], tokenizer: Any, seq_len: int, cache_dir: Path, streaming: bool = False,
                        **options):
    """`--data` items -> a packed dataset, a `Mixture` (items with weights), or with `streaming` a `TokenStream`."""
    sources = src.split_weights(items)
    if streaming and len(sources) > 1:
        raise UserError("--streaming reads one source in order; mixtures (PATH:WEIGHT) need stored tokens: drop "
                        "--streaming or the weights")
    if streaming:
        files = src.resolve_data_files(items, streaming=True)
        options.pop("num_proc", None)
        options.pop("progress", None)  # a stream is tokenised as training reads it
        recipe = Recipe(files, tokenizer, **options)
        loaded = src.load_parts(files, recipe.text_field, streaming=True)
        parts = [p for p, _ in loaded]
        logger.info("data %s: streamed, tokenised on the fly", _describe(items))
        return TokenStream(parts, recipe.function(parts, keep_rows=True), seq_len, origins=[o for _, o in loaded])
    parts = [build_packed_dataset(paths, tokenizer, seq_len, cache_dir, **options) for paths, _ in sources]
    if len(parts) == 1:
        return parts[0]
    mixture = Mixture(parts, [w for _, w in sources], [" ".join(p) for p, _ in sources])
    logger.info("data mixture: %s", mixture.describe())
    return mixture


def make_batches(train: Any, seed: int, rank: int = 0, world_size: int = 1):
    """The trainer's micro-batches (`next`, `state_dict`, `load_state_dict`) for `build_training_data`'s result."""
    if isinstance(train, TokenStream):  # it batches itself; under torchrun each process reads its share
        train.split(rank, world_size)
        return train
    if isinstance(train, Mixture):
        return Batches(train, MixtureSampler(train, seed, rank, world_size))
    return Batches(train, SequenceSampler(len(train), seed=seed, rank=rank, world_size=world_size))
