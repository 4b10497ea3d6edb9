"""Tokenizers as objects: a model's own, loaded with one-line errors for damaged files, and a small byte-level BPE
trained offline (for the small teachers trained here and for tests). Applying one to text is `tokenise`'s job."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lrc.errors import REDOWNLOAD, UserError, first_line, read_json_object

EOS = "<|endoftext|>"
# Tokenizer files read as JSON (checked first: a damaged one gets a line naming it), and the files one of
# which a folder with a tokenizer has.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` tokens trained on `texts`, with one end-of-text token (also BOS and pad)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=1 << 20)


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False, whose: str = "the teacher's",
                   if_missing: str = "copy the teacher's tokenizer files into it"):
    """The tokenizer of a model directory or hub id; UserError naming the file when one is damaged, or the
    folder when it has none."""
    p = Path(path_or_id)
    if p.is_dir():
        for name in TOKENIZER_JSON:
            if (p / name).is_file():
                read_json_object(p / name, f"{whose} tokenizer file")
    try:
        return AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except Exception as e:  # the tokenizers library raises plain Exceptions; any failure here is the files'
        if p.is_dir() and not any((p / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"{path_or_id} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                            f"{if_missing}") from None
        raise UserError(f"cannot load {whose} tokenizer from {path_or_id}: {first_line(e)}; its tokenizer files "
                        f"are damaged or incomplete: {REDOWNLOAD}") from None
