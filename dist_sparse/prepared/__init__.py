"""Prepared token data: ``dist-sparse prepare-data`` writes it (:mod:`.build`), training reads it through memory
maps (:mod:`.data`), in the order :mod:`.sampler` decides. The format is in :mod:`.format` and docs/data.md."""

from dist_sparse.prepared.data import PreparedData, check_with_model, training_data, vocab_size
from dist_sparse.prepared.format import read_index, tokenizer_sha256
from dist_sparse.prepared.sampler import WindowSampler

__all__ = ["PreparedData", "WindowSampler", "check_with_model", "read_index", "tokenizer_sha256", "training_data",
           "vocab_size"]
