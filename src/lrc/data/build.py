"""`--data` -> what the trainer reads: a packed dataset, a weighted `Mixture` of them, or a `TokenStream`.

A source's stream is stored once (`lrc.data.packed`) under a key of everything it depends on: the files'
paths, sizes and mtimes (contents are not hashed, which would cost a full read, so an edit keeping both is
missed), a hub split's `datasets` fingerprint, the tokenizer's serialised form, the document template, the
text field, the chat template and --train-on; not `seq_len`. Stale entries are never deleted. Under torchrun
LOCAL_RANK 0 builds a missing entry while the machine's other processes wait; then all memory-map it.
`lrc prepare` writes the same files and ``lrc-tokens.json`` into a folder that `--data` takes as a source.
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

from lrc.data import sources as src
from lrc.data import tokenise as tk
from lrc.data.chat import ChatRenderer, read_template
from lrc.data.packed import PackedDataset, open_store, write_store
from lrc.data.sampler import Batches, Mixture, MixtureSampler, SequenceSampler
from lrc.data.stream import TokenStream
from lrc.errors import UserError

logger = logging.getLogger(__name__)
CACHE_FORMAT = "lrc-packed-tokens-v3"  # bump when the layout or recipe changes; v3: datasets-built, chat, masks


def _describe(paths) -> str:
    names = [str(p) for p in paths]
    return names[0] if len(names) == 1 else f"the data ({len(names)} paths: {', '.join(names[:3])}, ...)"


def cache_key(files, tokenizer: Any, text_field: str, template: tk.DocumentTemplate, chat: dict | None = None) -> str:
    """The template is in the key by itself: a slow tokenizer's fingerprint does not show its special tokens."""
    material = {"format": CACHE_FORMAT, "files": src.file_fingerprints(files), "text_field": text_field,
                "tokenizer": tk.tokenizer_fingerprint(tokenizer), "chat": chat or {},
                "template": {"prefix": list(template.prefix), "suffix": list(template.suffix)}}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def once_per_machine(build):
    """`build()` on LOCAL_RANK 0 first while the others wait, then on the others (which find its result on
    disk). A failure there stops every process instead of leaving them waiting."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    first, error, result = int(os.environ.get("LOCAL_RANK", "0")) == 0, None, None
    if first:
        try:
            result = build()
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
    return result if first else build()


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

    def function(self, parts: list[Any]) -> tk.Tokenise:
        chat = any(src.CHAT in src.columns(p) for p in parts)
        return tk.Tokenise(self.tokenizer, self.template, ChatRenderer(
            self.tokenizer, read_template(self.tokenizer, self.chat_file), self.train_on, self.eos) if chat else None)

    def fill(self, batch_size: int = 256, num_proc: int = 1, progress: bool = False):
        """``fill(write_tokens, write_mask) -> doc_starts``: tokenise and pack, chunk by chunk."""
        import datasets

        def fill(write_tokens, write_mask) -> np.ndarray:
            parts = src.load_documents(self.files, self.text_field)
            fn = self.function(parts)
            features = datasets.Features({tk.IDS: datasets.List(datasets.Value("int32")), **(
                {tk.MASK: datasets.List(datasets.Value("uint8"))} if fn.masked else {})})
            starts, total = [np.zeros(0, np.int64)], 0
            for out in tk.tokenise(parts, fn, self.key, batch_size=batch_size, num_proc=num_proc,
                                   progress=progress, features=features):
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


def _checker(paths, text_field: str, seq_len: int):
    def check(starts: np.ndarray, total: int) -> None:
        if len(starts) == 0:
            raise UserError(f"no text found in {_describe(paths)}: every document is empty or blank (text field "
                            f"'{text_field}'); add text or pass --text-field NAME")
        if total < seq_len:
            raise UserError(f"{_describe(paths)} has {total} tokens, fewer than one training sequence of {seq_len}; "
                            "add data or lower --seq-len")
    return check


def _stored(folder: Path, stem: str, seq_len: int, fill, check) -> PackedDataset:
    """The store memory-mapped, written first when missing or damaged; checked either way (seq_len is not in
    the cache key)."""
    if (ds := open_store(folder, stem, seq_len)) is None:
        write_store(folder, stem, fill, check)
        ds = open_store(folder, stem, seq_len)
    assert ds is not None
    check(ds.doc_starts, len(ds.tokens))
    return ds


def open_prepared(folder: Path, tokenizer: Any, seq_len: int) -> PackedDataset:
    """A folder from `lrc prepare`, refused when the teacher's tokenizer is not the one it was made with."""
    meta = json.loads((folder / src.PREPARED_MARKER).read_text())
    mine, theirs = tk.tokenizer_fingerprint(tokenizer), meta.get("tokenizer", {})
    if meta.get("format") != CACHE_FORMAT or {**mine, "name_or_path": 0} != {**theirs, "name_or_path": 0}:
        raise UserError(f"{folder} was prepared with {theirs.get('name_or_path') or 'another tokenizer'}, whose "
                        f"tokenizer differs from the teacher's ({tk.tokenizer_name(tokenizer)}); run `lrc prepare` "
                        "again with this --teacher")
    ds = open_store(folder, "tokens", seq_len)
    if ds is None:
        raise UserError(f"{folder} is damaged (its token files are missing or cut short); run `lrc prepare` again")
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
        return open_prepared(files[0], tokenizer, seq_len)
    recipe = Recipe(files, tokenizer, text_field, chat_template, train_on)
    logger.info("documents are framed as %s + text + %s", list(recipe.template.prefix), list(recipe.template.suffix))
    fill, check = recipe.fill(batch_size, num_proc, progress), _checker(paths, text_field, seq_len)
    if cache_dir is None:
        tokens: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        starts = fill(tokens.append, masks.append)
        check(starts, sum(len(t) for t in tokens))
        return PackedDataset(np.concatenate(tokens), starts, seq_len, np.concatenate(masks) if masks else None)
    folder, stem = Path(cache_dir), f"tokens-{recipe.key}"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cache path {folder} is a file, not a folder; pass a folder for the token cache")
    ds = once_per_machine(lambda: _stored(folder, stem, seq_len, fill, check))
    logger.info("data %s: %s documents, %s tokens (cache %s)", _describe(paths), f"{len(ds.doc_starts):,}",
                f"{len(ds.tokens):,}", folder / stem)
    return ds


def prepare_tokens(paths, tokenizer: Any, out: Path, seq_len: int, text_field: str = "text", num_proc: int = 1,
                   chat_template: str | None = None, train_on: str = "all", progress: bool = True) -> PackedDataset:
    """`lrc prepare`: the packed stream of `paths` into the new folder `out`, with ``lrc-tokens.json``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out for the prepared tokens")
    recipe = Recipe(src.resolve_data_files(list(paths)), tokenizer, text_field, chat_template, train_on)
    ds = _stored(out, "tokens", seq_len, recipe.fill(256, num_proc, progress), _checker(paths, text_field, seq_len))
    meta = {"format": CACHE_FORMAT, "tokenizer": tk.tokenizer_fingerprint(tokenizer), "chat": recipe.chat,
            "sources": [str(f) for f in recipe.files], "text_field": text_field,
            "documents": len(ds.doc_starts), "tokens": len(ds.tokens)}
    (out / "meta.tmp").write_text(json.dumps(meta, indent=1))
    (out / "meta.tmp").replace(out / src.PREPARED_MARKER)  # last: marks the folder complete
    return ds


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
        parts = src.load_documents(files, recipe.text_field, streaming=True)
        logger.info("data %s: streamed, tokenised on the fly", _describe(items))
        return TokenStream(parts, recipe.function(parts), seq_len)
    parts = [build_packed_dataset(paths, tokenizer, seq_len, cache_dir, **options) for paths, _ in sources]
    if len(parts) == 1:
        return parts[0]
    mixture = Mixture(parts, [w for _, w in sources], [" ".join(p) for p, _ in sources])
    logger.info("data mixture: %s", mixture.describe())
    return mixture


def make_batches(train: Any, seed: int, rank: int = 0, world_size: int = 1):
    """The trainer's micro-batches (`next`, `state_dict`, `load_state_dict`) for `build_training_data`'s result."""
    if isinstance(train, TokenStream):  # it batches itself
        train.rank, train.world_size = rank, world_size
        return train
    if isinstance(train, Mixture):
        return Batches(train, MixtureSampler(train, seed, rank, world_size))
    return Batches(train, SequenceSampler(len(train), seed=seed, rank=rank, world_size=world_size))
