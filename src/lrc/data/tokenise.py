"""Documents -> token ids framed as the teacher's tokenizer frames a text, in parallel with `datasets`.

Texts are encoded in batches without special tokens and wrapped in those the tokenizer itself puts around a
text (detected, not looked up by model name): its BOS where it adds one (Llama 3, Mistral), none for Qwen, then
exactly one EOS. A teacher fed documents without the BOS it was trained with sees unfamiliar input and its
logits (the target) are off. Chat rows are rendered by `lrc.data.chat`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import jinja2
from tqdm.auto import tqdm

from lrc.data.chat import ChatRenderer, _a, conversation_problem
from lrc.data.sources import CHAT, TEXT
from lrc.errors import UserError

IDS, MASK = "input_ids", "loss_mask"
logger = logging.getLogger(__name__)
_PROBE = "Hello world"  # encoded with and without special tokens, it shows what a tokenizer puts around a text


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


@dataclass(frozen=True)
class DocumentTemplate:
    """Ids the tokenizer puts before and after a text; `suffix` always ends with one EOS (which separates
    a document from the next)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    def frame(self, text_ids: list[int]) -> list[int]:
        return [*self.prefix, *text_ids, *self.suffix]


def detect_document_template(tokenizer: Any, eos_id: int) -> DocumentTemplate:
    """A probe encoded with and without special tokens: the difference is the prefix and suffix (refused when
    the plain encoding is not a contiguous part of the other, as then the special tokens do not just wrap it)."""
    plain = list(tokenizer.encode(_PROBE, add_special_tokens=False))
    full = list(tokenizer.encode(_PROBE, add_special_tokens=True))
    cut = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None) \
        if plain else None
    if cut is None:
        raise UserError(f"cannot tell which special tokens tokenizer {tokenizer_name(tokenizer)} adds around a text: "
                        f"{_PROBE!r} encodes to {plain} without special tokens and to {full} with them; use a "
                        "tokenizer whose special tokens only wrap the text")
    prefix, suffix = full[:cut], full[cut + len(plain):]
    if not suffix or suffix[-1] != eos_id:
        suffix = suffix + [eos_id]
    return DocumentTemplate(tuple(int(i) for i in prefix), tuple(int(i) for i in suffix))


def eos_id_of(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError(f"tokenizer {tokenizer_name(tokenizer)} has no EOS token, which is needed to separate packed "
                        "documents; use a tokenizer whose config sets eos_token")
    return int(eos)


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Name, vocabulary sizes, EOS id and a hash of the serialised form (a slow tokenizer's: its vocabulary)."""
    backend: Any = getattr(tokenizer, "backend_tokenizer", None)
    material = backend.to_str() if hasattr(backend, "to_str") else \
        json.dumps(sorted(tokenizer.get_vocab().items())) if hasattr(tokenizer, "get_vocab") else None
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": getattr(tokenizer, "vocab_size", None),
            "len": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
            "eos_token_id": tokenizer.eos_token_id,
            "backend_sha256": hashlib.sha256(material.encode()).hexdigest() if material is not None else None}


class RowError(UserError):
    """A malformed row, at `index` of the mapped piece (the caller names its file and line)."""

    def __init__(self, index: int, problem: str):
        super().__init__(index, problem)  # both in args: the exception is pickled back from worker processes
        self.index, self.problem = index, problem


def _text_problem(text: Any) -> str | None:
    return None if text is None or isinstance(text, str) else f"its text is {_a(type(text).__name__)}, not a string"


class Tokenise:
    """The batched map function, TEXT or CHAT rows -> IDS (and MASK), dropping documents without tokens (with
    `keep_rows`: as empty rows, one row out per row in); a class, so worker processes get it pickled with the
    tokenizer. A malformed row raises `RowError`."""

    def __init__(self, tokenizer: Any, template: DocumentTemplate, chat: ChatRenderer | None,
                 keep_rows: bool = False):
        self.tokenizer, self.template, self.chat, self.keep_rows = tokenizer, template, chat, keep_rows
        self.masked = chat is not None and chat.train_on == "assistant"  # then every row gets a MASK

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        column = CHAT if CHAT in batch and self.chat is not None else TEXT
        check = conversation_problem if column == CHAT else _text_problem
        for i, row in enumerate(batch[column]):
            if (problem := check(row)) is not None:
                raise RowError(indices[i] if indices is not None else i, problem)
        if column == CHAT:
            rendered = [self._render(m, indices[i] if indices is not None else i) for i, m in enumerate(batch[CHAT])]
            out = {IDS: [ids for ids, _ in rendered]}
            if self.masked:
                out[MASK] = [mask for _, mask in rendered]
            return out
        texts = [t if t and t.strip() else "" for t in batch[TEXT]] if self.keep_rows else \
            [t for t in batch[TEXT] if t and t.strip()]
        # verbose=False: the "longer than model_max_length" warning is irrelevant when packing
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)[IDS] if texts else []
        framed = [self.template.frame(i) if len(i) else [] for i in ids] if self.keep_rows else \
            [self.template.frame(i) for i in ids if len(i)]
        # plain text beside chat under --train-on assistant: all targets
        return {IDS: framed, MASK: [[1] * len(f) for f in framed]} if self.masked else {IDS: framed}

    def _render(self, messages: list, index: int) -> tuple[list[int], list[int]]:
        assert self.chat is not None
        try:
            return self.chat.render(messages)
        except jinja2.TemplateError as e:  # the template's own checks (raise_exception)
            raise RowError(index, f"the chat template refuses it ({str(e).splitlines()[0] if str(e) else e})") from None


class DataProgress:
    """Progress of tokenising: a tqdm bar (documents, tokens, tokens/s, ETA) when stderr is a terminal, else a
    plain line at most every `every_s` seconds and one at the end (a log file has no use for a redrawn bar)."""

    def __init__(self, total: int, enabled: bool, every_s: float = 10.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.docs = self.tokens = 0
        self.start = self.last = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, unit=" docs", desc="tokenising")

    def _rate(self) -> float:
        return self.tokens / max(1e-9, time.time() - self.start)

    def update(self, docs: int, tokens: int) -> None:
        self.docs, self.tokens = self.docs + docs, self.tokens + tokens
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {self._rate():,.0f} tokens/s", refresh=False)
            self.bar.update(docs)
        elif self.enabled and time.time() - self.last >= self.every_s and self.docs < self.total:
            elapsed = time.time() - self.start
            eta = elapsed / max(1, self.docs) * (self.total - self.docs)
            logger.info("tokenising: %s of %s documents, %s tokens, %s tokens/s, about %.0f s left",
                        f"{self.docs:,}", f"{self.total:,}", f"{self.tokens:,}", f"{self._rate():,.0f}", eta)
            self.last = time.time()

    def close(self, finished: bool = True) -> None:
        """End the bar's line (before any error is printed); in logs, a closing line only when all was done."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and finished:
            logger.info("tokenised %s documents, %s tokens in %.1f s (%s tokens/s)", f"{self.docs:,}",
                        f"{self.tokens:,}", time.time() - self.start, f"{self._rate():,.0f}")


def tokenise(parts: list[Any], fn: Tokenise, key: str, *, batch_size: int, num_proc: int, progress: bool,
             features: Any = None, origins: list[Any] | None = None):
    """Every part tokenised, in contiguous shards, in order: each shard is one ``map(batched=True, num_proc=N)``
    cached under a fingerprint of `key`, part and shard. Shards exist for the progress bar (documents, tokens,
    tokens/s, ETA), updated between them; each costs a worker pool, so there are at most 32. A malformed row
    ends in a UserError naming its file and line (`origins`: each part's `sources.Origin`)."""
    import pyarrow.compute as pc  # heavy: only when data is read

    bar = DataProgress(sum(len(p) for p in parts), progress)
    try:  # the bar ends its line before any error is printed
        for index, part in enumerate(parts):
            origin = origins[index] if origins else None
            shards = max(1, min(32, math.ceil(len(part) / (num_proc * batch_size * 8))))
            for s in range(shards):
                piece = part.shard(shards, s, contiguous=True) if shards > 1 else part
                offset = len(part) // shards * s + min(s, len(part) % shards)  # datasets' contiguous shard
                material = f"{key}/{part._fingerprint}/{index}/{s}/{shards}"
                fingerprint = hashlib.sha256(material.encode()).hexdigest()[:32]
                procs = min(num_proc, len(piece)) if num_proc > 1 and len(piece) > 1 else None
                out = _map(piece, fn, origin, offset, batch_size=batch_size, num_proc=procs,
                           new_fingerprint=fingerprint, features=features)
                tokens = sum(int(pc.sum(c.value_lengths()).as_py() or 0) for c in out.data.column(IDS).chunks)
                bar.update(len(piece), tokens)
                yield out
    finally:
        bar.close(finished=sys.exc_info()[0] is None)


def _map(piece: Any, fn: Tokenise, origin: Any, offset: int, **options) -> Any:
    """`piece.map(fn)`, with a malformed row (at `offset` + its index in `piece`) as a one-line UserError."""
    try:
        return piece.map(fn, batched=True, with_indices=True, remove_columns=piece.column_names, **options)
    except RowError as e:
        raise UserError(f"{_where(origin, offset + e.index)}: {e.problem}; fix or remove that row") from None
    except UnicodeDecodeError as e:  # Arrow holds the bytes; decoding them for the batch fails
        row = origin.first_undecodable(piece) if origin is not None else None
        where = _where(origin, offset + row) if row is not None else "a row"
        raise UserError(f"{where} is not UTF-8 text ({e.reason}); convert the file to UTF-8") from None


def _where(origin: Any, row: int) -> str:
    return origin.row(row) if origin is not None else f"row {row}"
