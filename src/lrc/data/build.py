"""`--data` -> what the trainer reads: a packed dataset, a weighted mixture of them, or a token stream.

A source's token stream is stored once (`lrc.data.packed` files) under a key made of everything it depends
on: the files' paths, sizes and modification times (contents are not hashed: that costs a full read; an edit
keeping both size and mtime is not noticed), a hub split's `datasets` fingerprint, the tokenizer's serialised
form, the detected document template, the text field, the chat template and --train-on. `seq_len` is not in
the key (the stream does not depend on it); stale entries are never deleted automatically. Under torchrun the
first process on each machine (LOCAL_RANK 0) builds a missing entry while the others wait, then every
process memory-maps the same files. `lrc prepare` writes the same files plus ``lrc-tokens.json`` into a
folder that `--data` then takes as a source of its own, checked against the teacher's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from lrc.data.chat import ChatRenderer, read_template
from lrc.data.packed import PackedDataset, open_store, write_store
from lrc.data.sources import (
    CHAT,
    PREPARED_MARKER,
    DataSource,
    file_fingerprints,
    load_documents,
    resolve_data_files,
    split_weights,
)
from lrc.data.tokenise import (
    IDS,
    MASK,
    DocumentTemplate,
    Tokenise,
    detect_document_template,
    eos_id_of,
    tokenise,
    tokenizer_fingerprint,
    tokenizer_name,
)
from lrc.errors import UserError

logger = logging.getLogger(__name__)
CACHE_FORMAT = "lrc-packed-tokens-v3"  # bump when the layout or recipe changes; v3: datasets-built, chat, masks


def _describe(paths) -> str:
    names = [str(p) for p in paths]
    if len(names) == 1:
        return names[0]
    return f"the data ({len(names)} paths: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def cache_key(files: list[DataSource], tokenizer: Any, text_field: str, template: DocumentTemplate,
              chat: dict | None = None) -> str:
    """Hash of everything a source's token stream depends on (the template too: a slow tokenizer's
    fingerprint is its vocabulary only, which does not show its special tokens)."""
    material = {"format": CACHE_FORMAT, "files": file_fingerprints(files),
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "template": {"prefix": list(template.prefix), "suffix": list(template.suffix)},
                "text_field": text_field, "chat": chat or {}}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def once_per_machine(build):
    """Run `build()` on LOCAL_RANK 0 first while the machine's other processes wait (then they run it too,
    finding its result on disk). A failure there stops every process instead of leaving them waiting."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    error, result = None, None
    if first:
        try:
            result = build()
        except Exception as e:  # reported to every process below
            error = e
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    failed = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(failed)  # the barrier: nobody reads the cache before every machine's first process is done
    if error is not None:
        raise error
    if failed.item() > 0:
        raise UserError("preparing the data failed in another process (its error is printed there); fix it and "
                        "start again")
    return result if first else build()


class _Recipe:
    """How one source becomes tokens: the tokenizer, its document template, chat rendering and the key."""

    def __init__(self, files, tokenizer, text_field: str, chat_template: str | None, train_on: str):
        self.files, self.tokenizer, self.text_field = files, tokenizer, text_field
        self.eos = eos_id_of(tokenizer)
        self.template = detect_document_template(tokenizer, self.eos)
        self.chat_file, self.train_on = chat_template, train_on
        own = read_template(tokenizer, chat_template) if chat_template or getattr(tokenizer, "chat_template", None) \
            else None
        self.chat_settings = {"template": hashlib.sha256((own or "").encode()).hexdigest(), "train_on": train_on}
        self.key = cache_key(files, tokenizer, text_field, self.template, self.chat_settings)

    def function(self, parts: list[Any]) -> Tokenise:
        has_chat = any(CHAT in p.column_names for p in parts)
        renderer = ChatRenderer(self.tokenizer, read_template(self.tokenizer, self.chat_file), self.train_on,
                                self.eos) if has_chat else None
        return Tokenise(self.tokenizer, self.template, renderer)


def _fill(recipe: _Recipe, batch_size: int, num_proc: int, progress: bool):
    """``fill(write_tokens, write_mask) -> doc_starts`` for `write_store`, and for the in-memory build."""
    import datasets

    def fill(write_tokens, write_mask) -> np.ndarray:
        parts = load_documents(recipe.files, recipe.text_field)
        fn = recipe.function(parts)
        masked = fn.chat is not None and recipe.train_on == "assistant"
        features = datasets.Features({IDS: datasets.List(datasets.Value("int32")),
                                      **({MASK: datasets.List(datasets.Value("uint8"))} if masked else {})})
        starts, total = [], 0
        for out in tokenise(parts, fn, recipe.key, batch_size=batch_size, num_proc=num_proc, progress=progress,
                            features=features):
            for table in out.with_format("arrow").iter(batch_size=65536):
                ids = table.column(IDS).combine_chunks()
                lengths = ids.value_lengths().to_numpy().astype(np.int64)
                write_tokens(ids.flatten().to_numpy().astype(np.int32, copy=False))
                if masked:
                    write_mask(table.column(MASK).combine_chunks().flatten().to_numpy().astype(np.uint8))
                starts.append(total + np.concatenate(([0], np.cumsum(lengths[:-1]))) if len(lengths) else
                              np.zeros(0, np.int64))
                total += int(lengths.sum())
        return np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)

    return fill


def _checker(paths, text_field: str, seq_len: int):
    def check(starts: np.ndarray, total: int) -> None:
        if len(starts) == 0:
            raise UserError(f"no text found in {_describe(paths)}: every document is empty or blank (text field "
                            f"'{text_field}'); add text or pass --text-field NAME")
        if total < seq_len:
            raise UserError(f"{_describe(paths)} has {total} tokens, fewer than one training sequence of {seq_len}; "
                            "add data or lower --seq-len")
    return check


def open_prepared(folder: Path, tokenizer: Any, seq_len: int) -> PackedDataset:
    """A folder written by `lrc prepare`, refused when the teacher's tokenizer is not the one it was made with."""
    meta = json.loads((folder / PREPARED_MARKER).read_text())
    mine = {k: v for k, v in tokenizer_fingerprint(tokenizer).items() if k != "name_or_path"}
    theirs = {k: v for k, v in meta.get("tokenizer", {}).items() if k != "name_or_path"}
    if meta.get("format") != CACHE_FORMAT or mine != theirs:
        made_with = meta.get("tokenizer", {}).get("name_or_path") or "another tokenizer"
        raise UserError(f"{folder} was prepared with {made_with}, whose tokenizer differs from the teacher's "
                        f"({tokenizer_name(tokenizer)}); run `lrc prepare` again with this --teacher")
    ds = open_store(folder, "tokens", seq_len)
    if ds is None:
        raise UserError(f"{folder} is damaged (its token files are missing or cut short); run `lrc prepare` again")
    _checker([folder], "text", seq_len)(ds.doc_starts, len(ds.tokens))
    return ds


def build_packed_dataset(paths, tokenizer: Any, seq_len: int, cache_dir: Path | None = None,
                         text_field: str = "text", batch_size: int = 256, *, num_proc: int = 1,
                         chat_template: str | None = None, train_on: str = "all",
                         progress: bool = False) -> PackedDataset:
    """Tokenise and pack the documents under `paths` (see the module docstring); with `cache_dir` the stream is
    stored there and memory-mapped, without it kept in memory. A folder from `lrc prepare` is opened as is.

    Raises:
        UserError: bad paths or formats, a tokenizer without EOS or whose special tokens do not just wrap a
            text, no text, fewer than `seq_len` tokens, or a `cache_dir` that is a file; nothing is committed.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise UserError(f"sequence length must be an integer >= 2, got {seq_len!r}; pass --seq-len N")
    files = resolve_data_files(list(paths))
    if len(files) == 1 and isinstance(files[0], Path) and (files[0] / PREPARED_MARKER).is_file():
        return open_prepared(files[0], tokenizer, seq_len)
    recipe = _Recipe(files, tokenizer, text_field, chat_template, train_on)
    logger.info("documents are framed as %s + text + %s", list(recipe.template.prefix), list(recipe.template.suffix))
    fill, check = _fill(recipe, batch_size, num_proc, progress), _checker(paths, text_field, seq_len)
    if cache_dir is None:
        tokens: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        starts = fill(tokens.append, masks.append)
        check(starts, sum(len(t) for t in tokens))
        mask = np.concatenate(masks) if masks else None
        return PackedDataset(np.concatenate(tokens), starts, seq_len, mask)
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"cache path {cache_dir} is a file, not a folder; pass a folder for the token cache")
    stem = f"tokens-{recipe.key}"

    def build() -> PackedDataset:
        ds = open_store(cache_dir, stem, seq_len)
        if ds is None:
            write_store(cache_dir, stem, fill, check)
            ds = open_store(cache_dir, stem, seq_len)
        assert ds is not None
        check(ds.doc_starts, len(ds.tokens))
        return ds

    ds = once_per_machine(build)
    logger.info("data %s: %d documents, %d tokens (token cache %s)", _describe(paths), len(ds.doc_starts),
                len(ds.tokens), cache_dir / stem)
    return ds


def prepare_tokens(paths, tokenizer: Any, out: Path, seq_len: int, text_field: str = "text", num_proc: int = 1,
                   chat_template: str | None = None, train_on: str = "all", progress: bool = True) -> PackedDataset:
    """`lrc prepare`: the packed stream of `paths` written into the new folder `out`, with ``lrc-tokens.json``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out for the prepared tokens")
    files = resolve_data_files(list(paths))
    recipe = _Recipe(files, tokenizer, text_field, chat_template, train_on)
    write_store(out, "tokens", _fill(recipe, 256, num_proc, progress), _checker(paths, text_field, seq_len))
    ds = open_store(out, "tokens", seq_len)
    assert ds is not None
    meta = {"format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "sources": [str(f) for f in files],
            "text_field": text_field, "chat": recipe.chat_settings, "documents": int(len(ds.doc_starts)),
            "tokens": int(len(ds.tokens))}
    tmp = out / (PREPARED_MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / PREPARED_MARKER)
    return ds


def build_training_data(items: list[str], tokenizer: Any, seq_len: int, cache_dir: Path, streaming: bool = False,
                        **options):
    """`--data` items -> one packed dataset, a `Mixture` when the items carry weights (PATH:WEIGHT), or with
    `streaming` a `TokenStream`."""
    from lrc.data.sampler import Mixture

    sources = split_weights(items)
    if streaming:
        if len(sources) > 1:
            raise UserError("--streaming reads one source in order; mixtures (PATH:WEIGHT) need stored tokens: "
                            "drop --streaming or the weights")
        return build_stream(items, tokenizer, seq_len, options.get("text_field", "text"),
                            options.get("chat_template"), options.get("train_on", "all"))
    parts = [build_packed_dataset(paths, tokenizer, seq_len, cache_dir, **options) for paths, _ in sources]
    if len(sources) == 1:
        return parts[0]
    mixture = Mixture(parts, [w for _, w in sources], [" ".join(p) for p, _ in sources])
    logger.info("data mixture: %s", mixture.describe())
    return mixture


def build_stream(paths, tokenizer: Any, seq_len: int, text_field: str = "text", chat_template: str | None = None,
                 train_on: str = "all"):
    """`--streaming`: the sources read and tokenised on the fly (see `lrc.data.stream`)."""
    from lrc.data.stream import TokenStream

    files = resolve_data_files(list(paths), streaming=True)
    recipe = _Recipe(files, tokenizer, text_field, chat_template, train_on)
    parts = load_documents(files, text_field, streaming=True)
    logger.info("data %s: streamed, tokenised on the fly", _describe(paths))
    return TokenStream(parts, recipe.function(parts), seq_len)


def make_batches(train: Any, seed: int, rank: int = 0, world_size: int = 1):
    """The trainer's source of micro-batches for what `build_training_data` returned."""
    from lrc.data.sampler import Batches, Mixture, MixtureSampler, SequenceSampler
    from lrc.data.stream import TokenStream

    if isinstance(train, TokenStream):
        train.rank, train.world_size = rank, world_size
        return train
    if isinstance(train, Mixture):
        return Batches(train, MixtureSampler(train, seed, rank, world_size))
    return Batches(train, SequenceSampler(len(train), seed=seed, rank=rank, world_size=world_size))
