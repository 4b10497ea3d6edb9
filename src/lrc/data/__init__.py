"""Data for distillation: `sources` (reading with `datasets`), `tokenise` and `chat` (ids as the teacher frames
them), `packed` (the packed stream, on disk and in memory), `build` (caching, once per machine, `lrc prepare`,
mixtures), `sampler` (exact, resumable orders) and `stream` (`--streaming`)."""

from lrc.data.build import CACHE_FORMAT as _CACHE_FORMAT
from lrc.data.build import build_packed_dataset, build_training_data, make_batches, prepare_tokens
from lrc.data.build import cache_key as _cache_key
from lrc.data.packed import PackedDataset, collate, split_holdout, store_paths
from lrc.data.sampler import Batches, Mixture, MixtureSampler, SequenceSampler, calibration_order
from lrc.data.sources import DataSource, HubDataset, iter_documents, parse_hub_id, resolve_data_files
from lrc.data.sources import file_fingerprints as _file_fingerprints
from lrc.data.tokenise import DocumentTemplate, detect_document_template
from lrc.data.tokenise import tokenizer_fingerprint as _tokenizer_fingerprint


def _cache_paths(cache_dir, key: str, dtype="int32"):  # (tokens, document starts) files of a cache entry
    return store_paths(cache_dir, f"tokens-{key}", dtype)[:2]


__all__ = ["Batches", "DataSource", "DocumentTemplate", "HubDataset", "Mixture", "MixtureSampler", "PackedDataset",
           "SequenceSampler", "build_packed_dataset", "build_training_data", "calibration_order", "make_batches",
           "collate",
           "detect_document_template", "iter_documents", "parse_hub_id", "prepare_tokens", "resolve_data_files",
           "split_holdout", "_CACHE_FORMAT", "_cache_key", "_cache_paths", "_file_fingerprints",
           "_tokenizer_fingerprint"]
