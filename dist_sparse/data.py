"""Character- or byte-level text data, deterministic per (seed, step, rank, micro-batch).

The embedded default corpus is the Python standard library's own source files: every Python install has them, so
`make demo` needs no download and no data file. Batches are drawn from a generator seeded by the step index, so a
resumed run sees exactly the batches an uninterrupted run would, with no data-loader state to save.
"""

import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_sparse.errors import ConfigError

DEFAULT_MAX_CHARS = 3_000_000


def embedded_corpus(max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Concatenated ``*.py`` files of the running interpreter's standard library (sorted, deterministic)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise FileNotFoundError(f"no Python source files found under {stdlib} for the embedded corpus")
    return "".join(parts)[:max_chars]


def char_tokenizer(text: str):
    """Character-level ``PreTrainedTokenizerFast`` over the characters of ``text`` (sorted), ``<unk>`` at id 0.

    It round-trips through ``AutoTokenizer.from_pretrained``; the trainer's char-level ids are the same."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for ch in sorted(set(text)):
        vocab.setdefault(ch, len(vocab))
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", model_max_length=1 << 30)


@dataclass
class Tokenizer:
    """``char``: one id per character (``<unk>`` = 0, then the text's characters sorted); ``byte``: 256 ids;
    ``hf``: a Hugging Face tokenizer (the one saved with ``model.pretrained``)."""

    kind: str
    chars: list = field(default_factory=list)
    hf: object = None

    @classmethod
    def for_text(cls, kind: str, text: str) -> "Tokenizer":
        return cls(kind, ["<unk>", *sorted(set(text))] if kind == "char" else [])

    @classmethod
    def from_pretrained(cls, directory) -> "Tokenizer":
        from transformers import AutoTokenizer

        return cls("hf", hf=AutoTokenizer.from_pretrained(str(directory), local_files_only=True))

    @property
    def vocab_size(self) -> int:
        if self.kind == "hf":
            return len(self.hf)
        return 256 if self.kind == "byte" else len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        if self.kind == "byte":
            return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)
        if self.kind == "hf":
            return torch.tensor(self.hf(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        if self.kind == "byte":
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        if self.kind == "hf":
            return self.hf.decode([int(i) for i in ids])
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, directory) -> None:
        """Write ``dist_sparse_tokenizer.json`` and, except for byte level, a Hugging Face tokenizer."""
        directory = Path(directory)
        (directory / "dist_sparse_tokenizer.json").write_text(json.dumps({"kind": self.kind, "chars": self.chars}))
        if self.kind == "hf":
            self.hf.save_pretrained(str(directory))
        elif self.kind == "char":
            char_tokenizer("".join(self.chars[1:])).save_pretrained(str(directory))


class TextData:
    def __init__(self, data_cfg, block_size: int, seed: int, pretrained_dir=None):
        if data_cfg.path is None:
            text = embedded_corpus(data_cfg.max_chars or DEFAULT_MAX_CHARS)
            self.source = f"embedded: Python {sysconfig.get_python_version()} standard library sources"
        else:
            path = Path(data_cfg.path)
            if not path.is_file():
                raise ConfigError("data.path", f"data file not found: {path}")
            text = path.read_text(encoding="utf-8", errors="replace")
            if data_cfg.max_chars:
                text = text[: data_cfg.max_chars]
            self.source = str(path)
        # fine-tuning a checkpoint: its own tokenizer, so ids mean what the model learned
        has_tokenizer = pretrained_dir is not None and any(
            (Path(pretrained_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
        self.tokenizer = (Tokenizer.from_pretrained(pretrained_dir) if has_tokenizer
                          else Tokenizer.for_text(data_cfg.text_tokenizer, text))
        ids = self.tokenizer.encode(text)
        n_val = int(len(ids) * data_cfg.text_val_fraction)
        self.train_ids, self.val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
        if min(len(self.train_ids), len(self.val_ids)) <= block_size + 1:
            raise ConfigError("data.path", f"the text is too short for block_size {block_size}")
        self.block_size = block_size
        self.seed = seed

    def train_tokens(self) -> int:
        return len(self.train_ids)

    def read_train(self, start: int, length: int):
        """Training tokens ``[start, start + length)`` as int64 numpy (the epoch sampler's reads)."""
        return self.train_ids[start: start + length].numpy()

    def batch(self, split: str, step: int, rank: int, micro: int, batch_size: int) -> torch.Tensor:
        """A (batch_size, block_size) tensor of token ids, a pure function of its arguments."""
        ids = self.train_ids if split == "train" else self.val_ids
        # an explicit mix, not hash(): Python salts str hashes per process
        key = ((((self.seed * 1_000_003 + (split == "val")) * 1_000_033 + step) * 10_007 + rank) * 1_009 + micro)
        g = torch.Generator().manual_seed(key % (2**63 - 1))
        starts = torch.randint(0, len(ids) - self.block_size, (batch_size,), generator=g)
        return torch.stack([ids[s: s + self.block_size] for s in starts.tolist()])
