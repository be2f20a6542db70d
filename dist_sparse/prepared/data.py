"""Training data from a prepared directory (``data.prepared``), with the text loader's interface."""

from pathlib import Path

import numpy as np
import torch

from dist_sparse.errors import ConfigError
from dist_sparse.prepared.format import TOKENIZER_DIR, PreparedTokens, TokenStream, read_index
from dist_sparse.prepared.sampler import random_starts


class PreparedData:
    """Memory-mapped train/val token streams, the prepared tokenizer, and batches.

    ``batch(split, step, rank, micro, batch_size)`` is the text loader's random windows (evaluation uses it for the
    validation split); training batches come from :class:`dist_sparse.prepared.sampler.WindowSampler`."""

    def __init__(self, directory, block_size: int, seed: int, key: str = "data.prepared"):
        self.directory = Path(directory)
        self.index = read_index(self.directory, key)
        self.streams = {split: TokenStream(self.directory, self.index, split) for split in ("train", "val")}
        for split, stream in self.streams.items():
            if len(stream) <= block_size + 1:
                raise ConfigError(key, f"{self.directory}: the {split} split has {len(stream)} tokens, too few for "
                                       f"block_size {block_size}")
        self.block_size, self.seed = block_size, seed
        self._tokenizer = None
        n = {s: self.index["splits"][s]["tokens"] for s in ("train", "val")}
        self.source = (f"prepared: {self.directory} ({n['train']:,} train + {n['val']:,} val tokens, "
                       f"tokenizer {self.index['tokenizer'].get('name')})")

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def tokenizer(self) -> "PreparedTokenizer":
        if self._tokenizer is None:
            self._tokenizer = PreparedTokenizer(self.directory / TOKENIZER_DIR, self.vocab_size)
        return self._tokenizer

    def train_tokens(self) -> int:
        return len(self.streams["train"])

    def read_train(self, start: int, length: int) -> np.ndarray:
        return self.streams["train"].read(start, length)

    def tokens(self, split: str, limit: int | None = None) -> PreparedTokens:
        return PreparedTokens(self.streams[split], limit)

    def batch(self, split: str, step: int, rank: int, micro: int, batch_size: int) -> torch.Tensor:
        stream = self.streams[split]
        starts = random_starts(self.seed, split, step, rank, micro, batch_size, len(stream), self.block_size)
        return torch.from_numpy(np.stack([stream.read(int(s), self.block_size) for s in starts.tolist()]))


class PreparedTokenizer:
    """The prepared set's tokenizer. ``save`` copies its files byte for byte (not a re-serialization), so the final
    model's tokenizer has the SHA-256 recorded in the data's index and the checks between model and data hold."""

    def __init__(self, directory: Path, vocab_size: int):
        self.directory, self.vocab_size = Path(directory), vocab_size
        self._hf = None

    @property
    def hf(self):
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        return self._hf

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.hf(text)["input_ids"], dtype=torch.int64)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    def save(self, directory) -> None:
        import json
        import shutil

        from dist_sparse.prepared.format import TOKENIZER_COPY

        directory = Path(directory)
        for name in TOKENIZER_COPY:
            # config.json (kept for AutoTokenizer with some tokenizer directories) would replace the model's own
            if name != "config.json" and (self.directory / name).is_file():
                shutil.copyfile(self.directory / name, directory / name)
        (directory / "dist_sparse_tokenizer.json").write_text(json.dumps({"kind": "hf", "chars": []}))


def training_data(cfg):
    """The data a run trains on: prepared shards (``data.prepared``) or text (``data.path`` / embedded corpus)."""
    if cfg.data.prepared is not None:
        return PreparedData(cfg.data.prepared, cfg.model.block_size, cfg.train.seed)
    from dist_sparse.data import TextData

    return TextData(cfg.data, cfg.model.block_size, cfg.train.seed, pretrained_dir=cfg.model.pretrained)


def vocab_size(data) -> int:
    """The model's vocabulary for this data: the prepared index's (``len(tokenizer)`` when it was written)."""
    return data.vocab_size if isinstance(data, PreparedData) else data.tokenizer.vocab_size


def check_with_model(cfg) -> None:
    """Checks between ``data.prepared`` and the model, before any process group starts: the data's token ids must
    index the model's embedding, the prepared tokenizer must be the one saved with ``model.pretrained`` (same
    SHA-256), and ``model.block_size`` must fit the model's positions. A ConfigError names both keys."""
    data_key = "data.prepared"
    index = read_index(cfg.data.prepared, data_key) if cfg.data.prepared is not None else None
    # a checkpoint (model.pretrained) or, where the model section has one, a config.json (model.config)
    for model_key in ("model.pretrained", "model.config"):
        source = getattr(cfg.model, model_key.split(".")[1], None)
        if source is None:
            continue
        hf_config = _hf_config(source, model_key)
        rows = getattr(hf_config, "vocab_size", None)
        positions = _max_positions(hf_config)
        if positions is not None and cfg.model.block_size > positions:
            raise ConfigError("model.block_size", f"{cfg.model.block_size} exceeds the {positions} positions of "
                                                  f"{model_key} {source}")
        if index is None:
            continue
        if isinstance(rows, int) and index["max_token_id"] >= rows:
            raise ConfigError(data_key, f"{cfg.data.prepared} holds token ids up to {index['max_token_id']} "
                                        f"(vocabulary {index['vocab_size']}), beyond the {rows}-row embedding of "
                                        f"{model_key} {source}")
        if model_key == "model.pretrained":
            from dist_sparse.prepared.format import tokenizer_sha256

            theirs = tokenizer_sha256(source)
            if theirs is not None and theirs != index["tokenizer"]["sha256"]:
                raise ConfigError(data_key, f"{cfg.data.prepared} was tokenized with {index['tokenizer'].get('name')} "
                                            f"(tokenizer sha256 {index['tokenizer']['sha256'][:12]}...), not with "
                                            f"the tokenizer saved with {model_key} {source} (sha256 "
                                            f"{theirs[:12]}...): prepare the data with --tokenizer {source}")


def _hf_config(source, key: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=True)
    except Exception as exc:  # OSError, ValueError: an unreadable or foreign config.json
        raise ConfigError(key, f"cannot read the model config in {source}: {type(exc).__name__}: "
                               f"{str(exc)[:300]}") from None


def _max_positions(hf_config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


__all__ = ["PreparedData", "training_data", "vocab_size", "check_with_model"]
