"""``dist-sparse prepare-data``: text corpora -> tokenized, memory-mappable shards plus ``index.json``.

Inputs are read through Hugging Face ``datasets`` (Arrow tables on disk, never a whole file in memory; plain text
by paragraph), one record = one document. Documents are tokenized with ``Dataset.map(batched=True, num_proc=N)``
in chunks of a few tens of MB (so the progress bar can count tokens), each followed by EOS, assigned to train or
val by a seeded hash of the document's index (the split does not depend on ``--num-proc`` or the chunking), and
appended to the split's current shard. Everything is written into a temporary sibling directory that is renamed
into place after ``index.json``: a killed run leaves the previous state (nothing, or the old complete data).
"""

import codecs
import datetime
import glob
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_sparse.errors import DataError
from dist_sparse.faults import Faults
from dist_sparse.prepared.format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    TOKENIZER_COPY,
    TOKENIZER_DIR,
    VOCAB_FILES,
    dtype_for_vocab,
    read_index,
    tokenizer_sha256,
    verify_shards,
)
from dist_sparse.prepared.sampler import _mix32

EOS_TOKEN = "<|endoftext|>"  # of the tokenizers built here (bpe:N, char, byte)
FORMATS = ("json", "parquet", "csv", "text", "text-document", "disk")
EXTENSIONS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
              ".txt": "text", ".text": "text", ".md": "text"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard
CHUNK_BYTES = 16 << 20  # text bytes per map() call and process (progress granularity)
MIN_CHUNK_DOCS = 1000  # documents per map() call at least (a call starts a process pool)

# undecodable bytes become U+FFFD and are counted (the counter is per process: map's workers return their counts)
_BAD_BYTES = [0]


def _count_and_replace(exc):
    _BAD_BYTES[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("dist_sparse.count", _count_and_replace)


@dataclass
class Source:
    path: Path
    format: str

    def describe(self) -> dict:
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        return {"path": str(self.path), "format": self.format, "bytes": sum(f.stat().st_size for f in files),
                "mtime_ns": max((f.stat().st_mtime_ns for f in files), default=0)}


# ----------------------------------------------------------------------------------------------------------------
# inputs


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "disk"
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    if ext not in EXTENSIONS:
        raise DataError(str(path), f"unknown format (extension {ext or 'none'!r}); pass --format with one of "
                                   f"{', '.join(FORMATS)}")
    return EXTENSIONS[ext]


def resolve_inputs(inputs: list, fmt: str = "auto") -> list:
    """Files, globs or directories -> ``Source`` list (in the order given; a directory's files sorted). A
    ``save_to_disk`` directory is one source; another directory stands for the files inside it (hidden ones
    skipped; with ``--format auto`` only files of a known extension)."""
    if fmt not in ("auto", *FORMATS):
        raise DataError("--format", f"unknown format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    if not inputs:
        raise DataError("INPUT", "no input given")
    sources, seen = [], set()
    for item in inputs:
        item = str(item)
        paths = sorted(Path(p) for p in glob.glob(item, recursive=True)) if glob.has_magic(item) else [Path(item)]
        found = []
        for path in paths:
            if path.is_dir() and not _is_saved_dataset(path) and fmt != "disk":
                files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                    part.startswith(".") for part in p.relative_to(path).parts))
                if fmt == "auto":
                    files = [p for p in files if _known(p)]
                found += files
            elif path.exists():
                found.append(path)
        if not found:
            raise DataError(item, "no files match" + (" (no file of a known extension inside; pass --format)"
                                                      if Path(item).is_dir() else ""))
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                sources.append(Source(key, _format_of(path, fmt)))
    for s in sources:
        if s.format == "disk" and not _is_saved_dataset(s.path):
            hint = (f"; it is a DatasetDict with splits {', '.join(_splits_of(s.path))}: pass one split's directory"
                    if (s.path / "dataset_dict.json").is_file() else "")
            raise DataError(str(s.path), "not a datasets save_to_disk directory (no state.json and "
                                         f"dataset_info.json){hint}")
    return sources


def _splits_of(path: Path) -> list:
    try:
        return list(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
    except (OSError, ValueError, AttributeError):
        return []


def _known(path: Path) -> bool:
    try:
        _format_of(path, "auto")
        return True
    except DataError:
        return False


def _groups(sources: list) -> list:
    """Consecutive sources of one format form one ``load_dataset`` call (a directory of many files is one)."""
    groups = []
    for s in sources:
        if groups and groups[-1][0] == s.format and s.format != "disk":
            groups[-1][1].append(s.path)
        else:
            groups.append((s.format, [s.path]))
    return groups


def load_group(fmt: str, paths: list, text_column: str, cache_dir: Path):
    """One group as a ``datasets.Dataset`` with only the text column, renamed ``text``."""
    import datasets

    name = str(paths[0]) + (f" (and {len(paths) - 1} more {fmt} files)" if len(paths) > 1 else "")
    files = [str(p) for p in paths]
    try:
        if fmt == "disk":
            ds = datasets.load_from_disk(files[0])
        elif fmt in ("text", "text-document"):
            ds = datasets.load_dataset("text", data_files=files, split="train", cache_dir=str(cache_dir),
                                       sample_by="paragraph" if fmt == "text" else "document",
                                       encoding_errors="dist_sparse.count")
        elif fmt == "csv":
            ds = datasets.load_dataset("csv", data_files=files, split="train", cache_dir=str(cache_dir),
                                       encoding_errors="dist_sparse.count")
        else:
            ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=str(cache_dir))
    except DataError:
        raise
    except Exception as exc:  # datasets/pyarrow raise many types for a malformed file
        raise DataError(name, f"cannot read as {fmt}: {type(exc).__name__}: {str(exc)[:400]}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(name, f"is a DatasetDict with splits {', '.join(ds)}: pass one split's directory")
    column = "text" if fmt in ("text", "text-document") else text_column
    if column not in ds.column_names:
        raise DataError(name, f"no column {column!r} (columns: {', '.join(ds.column_names) or 'none'}); pass "
                              "--text-column")
    feature = ds.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(name, f"column {column!r} holds {feature}, not text; pass --text-column")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


# ----------------------------------------------------------------------------------------------------------------
# tokenizers


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (what the ``ByteLevel`` pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, model_max_length=1 << 30)


def byte_tokenizer():
    """256 byte ids (id = byte value), EOS = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return _wrap(tok)


def char_tokenizer(chars) -> object:
    """One id per character (``<unk>`` = 0, the characters sorted), EOS last."""
    from dist_sparse.data import char_tokenizer as text_char_tokenizer

    hf = text_char_tokenizer("".join(sorted(chars)))
    hf.add_special_tokens({"eos_token": EOS_TOKEN})
    return hf


def bpe_tokenizer(vocab_size: int, texts, length: int):
    """A byte-level BPE with ``vocab_size`` ids trained by ``tokenizers`` on ``texts`` (EOS = id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return _wrap(tok)


def parse_tokenizer(spec: str) -> tuple:
    """``--tokenizer`` -> (kind, argument): ``char``, ``byte``, ``bpe`` (N) or ``hf`` (directory)."""
    if spec in ("char", "byte"):
        return spec, None
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise DataError("--tokenizer", f"{spec!r}: bpe:N needs an integer vocabulary size N") from None
        if n < 258:
            raise DataError("--tokenizer", f"{spec!r}: a byte-level BPE needs N >= 258 (256 bytes, EOS, a merge)")
        if n > 1 << 32:
            raise DataError("--tokenizer", f"{spec!r}: a vocabulary of {n} ids is too large for uint32 token shards")
        return "bpe", n
    path = Path(spec)
    if not path.is_dir():
        raise DataError("--tokenizer", f"{spec!r} is not char, byte, bpe:N or a tokenizer directory")
    if not any((path / f).is_file() for f in ("tokenizer.json", *VOCAB_FILES)):
        raise DataError("--tokenizer", f"{path} holds no tokenizer files (none of tokenizer.json, "
                                       f"{', '.join(VOCAB_FILES)})")
    return "hf", path.resolve()


def load_hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # OSError, ValueError, ImportError (a sentencepiece model without the package)
        raise DataError("--tokenizer", f"{path}: cannot load the tokenizer: {type(exc).__name__}: "
                                       f"{str(exc)[:300]}") from None
    if tok.eos_token_id is None:
        raise DataError("--tokenizer", f"{path}: the tokenizer has no EOS token (eos_token), which separates "
                                       "documents; set one in its tokenizer_config.json")
    return tok


# ----------------------------------------------------------------------------------------------------------------
# tokenizing (runs inside Dataset.map's worker processes: module-level functions only)


def _val_flags(indices: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    return _doc_hash(indices, seed) < val_fraction


def _doc_hash(indices: np.ndarray, seed: int) -> np.ndarray:
    """A uniform value in [0, 1) per document index (seeded, counter-based)."""
    idx = np.asarray(indices, dtype=np.uint64)
    key = _mix32(np.array([seed & 0xFFFFFFFF], dtype=np.uint64) ^ np.uint64(0x5BD1E995))
    x = _mix32(_mix32((idx & np.uint64(0xFFFFFFFF)) ^ key) ^ (idx >> np.uint64(32)))
    return x.astype(np.float64) / float(1 << 32)


def decode(values) -> tuple:
    """Arrow string values -> (texts, undecodable bytes per record). Arrow may hold invalid UTF-8 (pyarrow's JSON
    reader does not check), so values are read as bytes and decoded here, replacing what does not decode."""
    texts, bad = [], []
    for raw in values:
        if raw is None:
            texts.append("")
            bad.append(0)
            continue
        before = _BAD_BYTES[0]
        texts.append(raw.decode("utf-8", errors="dist_sparse.count"))
        bad.append(_BAD_BYTES[0] - before)
    return texts, bad


def _text_bytes(table):
    import pyarrow as pa

    col = table.column("text")
    target = pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()
    return col.cast(target).to_pylist()


def tokenize_batch(table, indices, tokenizer, eos_id: int, seed: int, val_fraction: float, force: dict,
                   decoded_on_load: bool, paragraphs: bool, offset: int):
    """One map() batch: token ids per document (EOS appended; empty records give none), the split flag, and the
    counts the closing line reports. ``decoded_on_load``: text and csv files were decoded (and undecodable bytes
    replaced, counted per file) when loaded, so a record holding U+FFFD counts as one with undecodable bytes.
    ``indices`` count from the start of the chunk being mapped; ``offset`` makes them global document indices,
    which decide the split (so it does not depend on the chunking or ``--num-proc``).
    ``paragraphs``: plain text split at blank lines, where newlines at either end of a record are separators
    (``datasets`` leaves the file's final newline, and the third of three, on a paragraph)."""
    import pyarrow as pa

    texts, bad = decode(_text_bytes(table))
    if paragraphs:
        texts = [t.strip("\n") for t in texts]
    if decoded_on_load:
        bad = [max(b, 1) if "\ufffd" in t else b for t, b in zip(texts, bad)]
    keep = [i for i, t in enumerate(texts) if t]
    encoded = [[] for _ in texts]
    if keep:
        batch = [texts[i] for i in keep]
        if hasattr(tokenizer, "encode_batch"):  # a tokenizers.Tokenizer (the fast path)
            ids = [e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=True)]
        else:
            ids = tokenizer(batch, add_special_tokens=True)["input_ids"]
        for i, seq in zip(keep, ids):
            seq = list(seq)
            if not seq or seq[-1] != eos_id:
                seq.append(eos_id)
            encoded[i] = seq
    idx = np.asarray(indices, dtype=np.int64) + offset
    val = _val_flags(idx, seed, val_fraction)
    for j, i in enumerate(idx):
        if int(i) == force.get("val"):
            val[j] = True
        elif int(i) == force.get("train"):
            val[j] = False
    lengths = np.array([len(s) for s in encoded], dtype=np.int64)
    flat = np.fromiter((t for s in encoded for t in s), dtype=np.int64, count=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return pa.table({"ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)),
                     "val": pa.array(val), "empty": pa.array([not t for t in texts]), "bad_bytes": pa.array(bad)})


# ----------------------------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """One split's shards: ``{split}_{n:05d}.bin``, each at most ``shard_tokens`` tokens, SHA-256 on the fly,
    fsynced when closed."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int, faults: Faults):
        self.directory, self.split, self.dtype, self.limit = directory, split, np.dtype(DTYPES[dtype]), shard_tokens
        self.faults = faults
        self.shards, self.file, self.count, self.hash = [], None, 0, None
        self.documents = 0

    def _open(self):
        import hashlib

        self.name = f"{self.split}_{len(self.shards):05d}.bin"
        self.file = open(self.directory / self.name, "wb")
        self.count, self.hash = 0, hashlib.sha256()

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype.newbyteorder("<"), copy=False)
        while len(ids):
            if self.file is None:
                self._open()
            take = min(len(ids), self.limit - self.count)
            data = ids[:take].tobytes()
            self.file.write(data)
            self.hash.update(data)
            self.count += take
            ids = ids[take:]
            if self.count == self.limit:
                self._close()

    def _close(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        self.shards.append({"file": self.name, "tokens": self.count, "sha256": self.hash.hexdigest()})
        # fault injection (tests): SIGKILL once this many shards of all splits are on disk, before the index
        self.faults.written += 1
        if self.faults.active("prepare_kill", self.faults.written):
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> dict:
        if self.file is not None and self.count:
            self._close()
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Temporary directories of killed runs (their process is gone) next to ``out``."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# the command


@dataclass
class Options:
    inputs: list
    tokenizer: str
    out: str
    text_column: str = "text"
    format: str = "auto"
    val_fraction: float = 0.01
    num_proc: int = 1
    seed: int = 0
    overwrite: bool = False
    dtype: str = "auto"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    progress: bool = True


def check_options(opts: Options) -> None:
    if not 0.0 < opts.val_fraction < 1.0:
        raise DataError("--val-fraction", f"must be in (0, 1), got {opts.val_fraction}")
    if opts.num_proc < 1:
        raise DataError("--num-proc", f"must be >= 1, got {opts.num_proc}")
    if opts.shard_tokens < 1:
        raise DataError("--shard-tokens", f"must be >= 1, got {opts.shard_tokens}")
    if opts.dtype not in ("auto", *DTYPES):
        raise DataError("--dtype", f"must be auto, uint16 or uint32, got {opts.dtype!r}")
    if not opts.text_column:
        raise DataError("--text-column", "must not be empty")


def _out_state(out: Path, opts: Options, key: dict):
    """'fresh', 'up-to-date' (with the index), or 'replace'; refusals are DataErrors naming --out."""
    if not out.exists():
        return "fresh", None
    if not out.is_dir():
        raise DataError("--out", f"{out} exists and is not a directory")
    if not (out / INDEX).is_file():
        if any(out.iterdir()):
            raise DataError("--out", f"{out} exists, is not empty and holds no prepared data ({INDEX}): refusing "
                                     "to replace it; choose another --out")
        return "fresh", None
    try:
        index = read_index(out, "--out")
    except Exception:
        index = None
    if index is not None and index.get("options") == key["options"] and index.get("sources") == key["sources"]:
        try:
            verify_shards(out, index, "--out")
            return "up-to-date", index
        except Exception:
            index = None
    if not opts.overwrite:
        what = "an unreadable or damaged earlier run" if index is None else _differences(index, key)
        raise DataError("--out", f"{out} holds prepared data from {what}; pass --overwrite to replace it")
    return "replace", None


def _differences(index: dict, key: dict) -> str:
    diffs = [k for k in key["options"] if index.get("options", {}).get(k) != key["options"][k]]
    if index.get("sources") != key["sources"]:
        diffs.insert(0, "inputs")
    return "other " + ", ".join(diffs) if diffs else "another run"


def prepare(opts: Options, log=print) -> dict:
    """Run ``dist-sparse prepare-data``; returns the index (the existing one when up to date)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # --num-proc processes, one thread each (see docs/data.md)
    check_options(opts)
    t_start = time.perf_counter()
    sources = resolve_inputs(opts.inputs, opts.format)
    kind, arg = parse_tokenizer(opts.tokenizer)
    out = Path(opts.out).resolve()
    key = {"options": {"tokenizer": opts.tokenizer if kind != "hf" else str(arg),
                       "tokenizer_sha256": tokenizer_sha256(arg) if kind == "hf" else None,
                       "text_column": opts.text_column, "format": opts.format, "val_fraction": opts.val_fraction,
                       "seed": opts.seed, "dtype": opts.dtype, "shard_tokens": opts.shard_tokens},
           "sources": [s.describe() for s in sources]}
    _clean_stale(out)
    state, index = _out_state(out, opts, key)
    if state == "up-to-date":
        t, v = index["splits"]["train"], index["splits"]["val"]
        log(f"{out} is up to date: {t['documents'] + v['documents']:,} documents, {t['tokens'] + v['tokens']:,} "
            f"tokens (same inputs and options; shards verified)")
        return index
    hf_tok = load_hf_tokenizer(arg) if kind == "hf" else None

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        index = _prepare_into(tmp, opts, sources, kind, arg, hf_tok, key, log, t_start)
        if out.exists():  # an empty directory, or (--overwrite) earlier prepared data
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _prepare_into(tmp: Path, opts: Options, sources, kind, arg, hf_tok, key, log, t_start) -> dict:
    cache = tmp / ".hf_cache"  # load_dataset's Arrow copies: inside the temporary directory, removed with it
    bad_start = _BAD_BYTES[0]
    groups = [(fmt, paths, load_group(fmt, paths, opts.text_column, cache)) for fmt, paths in _groups(sources)]
    bad_on_load = _BAD_BYTES[0] - bad_start  # text and csv files are decoded while loading
    n_docs = sum(len(ds) for _, _, ds in groups)
    if n_docs < 2:
        raise DataError(str(sources[0].path), f"{n_docs} record(s): at least 2 documents are needed for a train "
                                              "and a val split")
    force = _forced_split(n_docs, opts.seed, opts.val_fraction)

    tok_dir = tmp / TOKENIZER_DIR
    t_tok = time.perf_counter()
    if kind == "hf":
        tok_dir.mkdir()
        for name in TOKENIZER_COPY:
            if (arg / name).is_file():
                shutil.copy2(arg / name, tok_dir / name)
        hf = hf_tok
    elif kind == "byte":
        hf = byte_tokenizer()
    elif kind == "char":
        chars = set()
        for texts in _iter_texts(groups):
            for t in texts:
                chars.update(t)
        hf = char_tokenizer(chars)
    else:
        n_train = n_docs - int(round(n_docs * opts.val_fraction))
        hf = bpe_tokenizer(arg, _iter_texts(groups, train_only=(opts.seed, opts.val_fraction, force)), n_train)
    if kind != "hf":
        hf.save_pretrained(str(tok_dir))
    tokenizer_seconds = time.perf_counter() - t_tok
    vocab = len(hf)
    eos_id = int(hf.eos_token_id)
    dtype = dtype_for_vocab(vocab) if opts.dtype == "auto" else opts.dtype
    if vocab > np.iinfo(DTYPES[dtype]).max + 1:
        raise DataError("--dtype" if opts.dtype != "auto" else "--tokenizer",
                        f"a vocabulary of {vocab} ids is too large for {dtype} token shards (at most "
                        f"{np.iinfo(DTYPES[dtype]).max + 1} ids)" + ("; use --dtype auto" if opts.dtype != "auto"
                                                                       else ""))
    encoder = hf.backend_tokenizer if getattr(hf, "is_fast", False) else hf
    if encoder is not hf:  # as tokenizer(text) does: no truncation or padding from the saved tokenizer.json
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_str(encoder.to_str())
        encoder.no_truncation()
        encoder.no_padding()

    faults = Faults.from_env(0)
    faults.written = 0
    writers = {s: ShardWriter(tmp, s, dtype, opts.shard_tokens, faults) for s in ("train", "val")}
    counts = {"empty_records": 0, "undecodable_records": 0, "undecodable_bytes": bad_on_load}
    max_id, tokens_total = 0, 0
    progress = None
    if opts.progress:
        from tqdm import tqdm

        progress = tqdm(total=n_docs, unit="doc", unit_scale=True, desc="prepare-data", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0)
    t0, offset = time.perf_counter(), 0
    for fmt, _, ds in groups:
        n = len(ds)
        per_doc = max(1.0, ds.data.nbytes / max(1, n))
        chunk = max(MIN_CHUNK_DOCS, int(CHUNK_BYTES * opts.num_proc / per_doc))
        for lo in range(0, n, chunk):
            part = ds.select(range(lo, min(n, lo + chunk))).with_format("arrow")
            mapped = part.map(tokenize_batch, batched=True, batch_size=500, with_indices=True,
                              # None: in this process (datasets would start a pool even for num_proc=1)
                              num_proc=opts.num_proc if opts.num_proc > 1 and len(part) >= 2 * opts.num_proc
                              else None,
                              keep_in_memory=True, remove_columns=["text"],
                              fn_kwargs={"tokenizer": encoder, "eos_id": eos_id, "seed": opts.seed,
                                         "val_fraction": opts.val_fraction, "force": force, "offset": offset + lo,
                                         "decoded_on_load": fmt in ("text", "text-document", "csv"),
                                         "paragraphs": fmt == "text"},
                              new_fingerprint=f"prepare-{offset + lo}")
            for batch in mapped.data.to_batches(max_chunksize=4096):
                ids, val = batch.column("ids"), batch.column("val").to_numpy(zero_copy_only=False)
                empty = batch.column("empty").to_numpy(zero_copy_only=False)
                bad = batch.column("bad_bytes").to_numpy(zero_copy_only=False)
                counts["empty_records"] += int(empty.sum())
                counts["undecodable_records"] += int((bad > 0).sum())
                if fmt not in ("text", "text-document", "csv"):  # those were counted while loading
                    counts["undecodable_bytes"] += int(bad.sum())
                for split, mask in (("val", val & ~empty), ("train", ~val & ~empty)):
                    if not mask.any():
                        continue
                    import pyarrow.compute as pc

                    flat = pc.filter(ids, mask).flatten().to_numpy(zero_copy_only=False)
                    if len(flat):
                        top = int(flat.max())
                        if top >= vocab:
                            raise DataError("--tokenizer", f"the tokenizer produced id {top}, outside its "
                                                           f"vocabulary of {vocab}")
                        max_id = max(max_id, top)
                    writers[split].write(flat)
                    writers[split].documents += int(mask.sum())
                    tokens_total += len(flat)
            if progress is not None:
                progress.update(len(part))
                rate = tokens_total / max(1e-9, time.perf_counter() - t0)
                progress.set_postfix_str(f"{tokens_total / 1e6:.1f}M tokens, {rate / 1e3:.0f}k tokens/s")
        offset += n
    if progress is not None:
        progress.close()
    seconds = time.perf_counter() - t0
    splits = {s: w.close() for s, w in writers.items()}
    for s in ("train", "val"):
        if splits[s]["tokens"] == 0:
            raise DataError("--val-fraction", f"the {s} split is empty (every document drawn for it was empty); "
                                              "change --val-fraction or --seed")
    shutil.rmtree(cache, ignore_errors=True)
    index = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype, "vocab_size": vocab, "eos_id": eos_id,
        "bos_id": hf.bos_token_id, "max_token_id": max(max_id, eos_id),
        "tokenizer": {"name": opts.tokenizer, "kind": kind, "path": TOKENIZER_DIR,
                      "sha256": tokenizer_sha256(tok_dir), "class": type(hf).__name__},
        "splits": splits, "sources": key["sources"], "skipped": counts, "options": key["options"],
        "stats": {"tokenize_seconds": seconds, "tokens_per_second": tokens_total / max(seconds, 1e-9),
                  "tokenizer_seconds": tokenizer_seconds, "num_proc": opts.num_proc,
                  "total_seconds": time.perf_counter() - t_start},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(tmp / INDEX, index)  # last: its presence says the directory is complete
    _fsync_dir(tmp)
    t, v = splits["train"], splits["val"]
    skipped = (f"skipped {counts['empty_records']:,} empty records; {counts['undecodable_records']:,} records had "
               f"undecodable bytes ({counts['undecodable_bytes']:,} bytes replaced by U+FFFD)")
    log(f"prepared {Path(opts.out)}: {t['documents'] + v['documents']:,} documents (train {t['documents']:,}, val "
        f"{v['documents']:,}), {t['tokens'] + v['tokens']:,} tokens (train {t['tokens']:,}, val {v['tokens']:,}) in "
        f"{len(t['shards']) + len(v['shards'])} {dtype} shards, vocabulary {vocab:,}; {skipped}; "
        f"{tokens_total / max(seconds, 1e-9) / 1e3:,.0f}k tokens/s with {opts.num_proc} process(es)")
    return index


def _forced_split(n_docs: int, seed: int, val_fraction: float) -> dict:
    """Keep both splits non-empty: with no document drawn for val, the one with the smallest hash goes there;
    with every document drawn for val, the one with the largest stays in train (1M hashes at a time)."""
    lo_val, lo_i, hi_val, hi_i, n_val = 2.0, 0, -1.0, 0, 0
    for start in range(0, n_docs, 1 << 20):
        h = _doc_hash(np.arange(start, min(n_docs, start + (1 << 20))), seed)
        n_val += int((h < val_fraction).sum())
        if h.min() < lo_val:
            lo_val, lo_i = float(h.min()), start + int(h.argmin())
        if h.max() > hi_val:
            hi_val, hi_i = float(h.max()), start + int(h.argmax())
    if n_val == 0:
        return {"val": lo_i}
    if n_val == n_docs:
        return {"train": hi_i}
    return {}


def _iter_texts(groups, train_only=None):
    """Decoded texts in batches (for the char vocabulary and BPE training); ``train_only``: (seed, val fraction,
    forced) to skip the val documents, as BPE is trained on the training split only."""
    offset = 0
    for fmt, _, ds in groups:
        for batch in ds.data.to_batches(max_chunksize=2048):
            import pyarrow as pa

            before = _BAD_BYTES[0]
            texts, _ = decode(_text_bytes(pa.Table.from_batches([batch])))
            if fmt == "text":  # as tokenize_batch reads paragraphs
                texts = [t.strip("\n") for t in texts]
            if train_only is not None:
                seed, frac, force = train_only
                idx = np.arange(offset, offset + len(texts))
                val = _val_flags(idx, seed, frac)
                val[idx == force.get("val", -1)] = True
                val[idx == force.get("train", -1)] = False
                texts = [t for t, v in zip(texts, val) if not v and t]
            _BAD_BYTES[0] = before  # counted once, when tokenizing
            offset += batch.num_rows
            yield texts
