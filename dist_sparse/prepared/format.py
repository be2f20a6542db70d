"""The on-disk format of a prepared data directory (written by ``dist-sparse prepare-data``) and its reader.

Layout of ``DIR``::

    index.json                 what is here (below); written last, so a directory without it is not prepared data
    tokenizer/                 the tokenizer files (a Hugging Face tokenizer: AutoTokenizer.from_pretrained loads it)
    train_00000.bin ...        token ids, raw little-endian uint16 (vocabulary <= 65536) or uint32, documents
    val_00000.bin ...          concatenated in order, each one followed by the EOS id

``index.json`` keys (a contract): ``format`` (``dist_sparse.prepared``), ``format_version``, ``dtype``,
``vocab_size``, ``eos_id``, ``bos_id``, ``max_token_id``, ``tokenizer`` (``name``: the ``--tokenizer`` argument,
``kind``, ``path``: ``tokenizer``, ``sha256``), ``splits`` (``train`` / ``val``: ``documents``, ``tokens``,
``shards``: ``[{file, tokens, sha256}]``), ``sources`` (``[{path, bytes, format}]``), ``skipped``
(``empty_records``, ``undecodable_records``, ``undecodable_bytes``), ``options`` (what decides the output: the
up-to-date check compares them) and ``created``.

The shards are read through ``np.memmap``: a rank's resident memory holds only the pages it touches (they are
file-backed and the kernel may drop them at will), so it does not grow with the corpus. Everything read here is
JSON or raw integers: an untrusted directory can make loading fail with a typed error, nothing else.
"""

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from dist_sparse.errors import ConfigError

FORMAT = "dist_sparse.prepared"
FORMAT_VERSION = 1
INDEX = "index.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# the tokenizer's identity: its tokenizer.json, or, for tokenizers without one, its vocabulary files
VOCAB_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
# what is copied from a tokenizer directory into DIR/tokenizer (AutoTokenizer needs config.json for some models)
TOKENIZER_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "chat_template.jinja", "chat_template.json", "config.json", *VOCAB_FILES)
_SHARD_NAME = re.compile(r"^(train|val)_\d{5,}\.bin$")


def tokenizer_sha256(directory) -> str | None:
    """SHA-256 of the tokenizer in ``directory``: of ``tokenizer.json`` when there is one, else of its vocabulary
    files (name and bytes, in name order); None when the directory has neither."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return file_sha256(directory / "tokenizer.json")
    files = [directory / f for f in VOCAB_FILES if (directory / f).is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode() + b"\0")
        h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _fail(key: str, directory, message: str):
    raise ConfigError(key, f"{directory}: {message}")


def read_index(directory, key: str = "data.prepared") -> dict:
    """``DIR/index.json``, checked: a ConfigError naming ``key`` and the directory for anything missing, of the
    wrong type or pointing outside the directory (shard names are plain file names)."""
    directory = Path(directory)
    path = directory / INDEX
    if not directory.is_dir():
        _fail(key, directory, "prepared data directory not found")
    if not path.is_file():
        _fail(key, directory, f"no {INDEX}: not a prepared data directory (write one with dist-sparse prepare-data; "
                              "an interrupted run leaves none)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(key, directory, f"cannot read {INDEX}: {exc}")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        _fail(key, directory, f"{INDEX} is not a {FORMAT} index")
    if index.get("format_version") != FORMAT_VERSION:
        _fail(key, directory, f"{INDEX} has format_version {index.get('format_version')!r}; this dist_sparse reads "
                              f"version {FORMAT_VERSION} (prepare the data again)")
    if index.get("dtype") not in DTYPES:
        _fail(key, directory, f"{INDEX}: dtype must be one of {', '.join(DTYPES)}, got {index.get('dtype')!r}")
    for name in ("vocab_size", "eos_id", "max_token_id"):
        value = index.get(name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            _fail(key, directory, f"{INDEX}: {name} must be a non-negative integer, got {value!r}")
    if index["max_token_id"] >= index["vocab_size"] or index["eos_id"] >= index["vocab_size"]:
        _fail(key, directory, f"{INDEX}: token ids (max {index['max_token_id']}, EOS {index['eos_id']}) must be "
                              f"below vocab_size {index['vocab_size']}")
    tok = index.get("tokenizer")
    if not (isinstance(tok, dict) and tok.get("path") == TOKENIZER_DIR and isinstance(tok.get("sha256"), str)):
        _fail(key, directory, f"{INDEX}: tokenizer must be {{name, kind, path: {TOKENIZER_DIR!r}, sha256}}")
    splits = index.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        _fail(key, directory, f"{INDEX}: splits must hold exactly {', '.join(SPLITS)}")
    itemsize = np.dtype(DTYPES[index["dtype"]]).itemsize
    for split in SPLITS:
        entry = splits[split]
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            _fail(key, directory, f"{INDEX}: splits.{split}.shards must be a list")
        total = 0
        for shard in shards:
            name, tokens = (shard.get("file"), shard.get("tokens")) if isinstance(shard, dict) else (None, None)
            if not (isinstance(name, str) and _SHARD_NAME.match(name) and name.startswith(split)):
                _fail(key, directory, f"{INDEX}: bad shard file name {name!r} in splits.{split}")
            if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0):
                _fail(key, directory, f"{INDEX}: shard {name}: tokens must be a positive integer")
            f = directory / name
            if not f.is_file():
                _fail(key, directory, f"shard {name} is missing")
            if f.stat().st_size != tokens * itemsize:
                _fail(key, directory, f"shard {name} has {f.stat().st_size} bytes, the index says {tokens} "
                                      f"{index['dtype']} tokens ({tokens * itemsize} bytes)")
            total += tokens
        if entry.get("tokens") != total:
            _fail(key, directory, f"{INDEX}: splits.{split}.tokens is {entry.get('tokens')!r}, its shards hold "
                                  f"{total}")
    return index


def verify_shards(directory, index: dict, key: str = "data.prepared") -> None:
    """Check every shard's SHA-256 against the index (reads all the data once)."""
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            if file_sha256(Path(directory) / shard["file"]) != shard.get("sha256"):
                _fail(key, directory, f"shard {shard['file']}: SHA-256 differs from {INDEX} (the file changed)")


class TokenStream:
    """One split's shards as a single read-only sequence of token ids (memory-mapped, never loaded whole)."""

    def __init__(self, directory, index: dict, split: str):
        dtype = DTYPES[index["dtype"]]
        self.maps = [np.memmap(Path(directory) / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                     for s in index["splits"][split]["shards"]]
        # start offset of each shard, and the total at the end (a few integers per shard)
        self.offsets = np.concatenate([[0], np.cumsum([len(m) for m in self.maps])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64 (a copy: the memory map itself stays untouched)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {len(self)})")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.offsets[i])
            take = min(length - done, len(self.maps[i]) - lo)
            out[done:done + take] = self.maps[i][lo:lo + take]
            done += take
            i += 1
        return out


class PreparedTokens:
    """A 1-D view of a split for ``dist-sparse eval`` (``numel()`` and slicing, as the perplexity loop needs)."""

    def __init__(self, stream: TokenStream, limit: int | None = None):
        self.stream = stream
        self.n = len(stream) if limit is None else min(limit, len(stream))

    def numel(self) -> int:
        return self.n

    def __getitem__(self, item):
        import torch

        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("PreparedTokens supports contiguous slices only")
        start, stop, _ = item.indices(self.n)
        return torch.from_numpy(self.stream.read(start, max(0, stop - start)))
