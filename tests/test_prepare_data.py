"""`dist-sparse prepare-data` and prepared data: formats, tokenizers, atomicity, bad input, the epoch sampler, the
config checks, `dist-sparse eval --prepared`, and one 2-rank training run resumed on 1 rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_sparse.errors import ConfigError, DataError
from dist_sparse.prepared import build
from dist_sparse.prepared import format as fmt
from dist_sparse.prepared import sampler as S
from dist_sparse.prepared.build import Options, prepare

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega naïve café Grüße 東京 🙂").split()


def documents(n=40):
    """Distinct documents without blank lines (so that paragraph-split text files hold the same records)."""
    rng = np.random.default_rng(1)
    docs = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 5 + i % 13)]
        docs.append(f"doc {i}: " + " ".join(words) + ("\nsecond line." if i % 3 == 0 else ""))
    return docs


def write_inputs(root: Path, docs) -> dict:
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": root / "c.jsonl", "parquet": root / "c.parquet", "text": root / "c.txt", "disk": root / "ds"}
    paths["jsonl"].write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    ds = datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})
    ds.to_parquet(str(paths["parquet"]))
    ds.save_to_disk(str(paths["disk"]))
    paths["text"].write_text("\n\n".join(docs) + "\n")
    return paths


def hf_tokenizer_dir(root: Path, docs) -> Path:
    """A Hugging Face tokenizer built here (no download): a tiny BPE that adds BOS, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = root / "hf_tok"
    hf.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = documents()
    return docs, write_inputs(root, docs), hf_tokenizer_dir(root, docs)


def run(inputs, out, tokenizer, **kw) -> dict:
    return prepare(Options(inputs=[str(i) for i in inputs], tokenizer=str(tokenizer), out=str(out), progress=False,
                           **kw), log=lambda *_: None)


def split_tokens(out: Path, split: str) -> np.ndarray:
    index = fmt.read_index(out)
    stream = fmt.TokenStream(out, index, split)
    return stream.read(0, len(stream))


def assert_direct_tokenization(out: Path, docs):
    """Each split's tokens are its documents in input order, each tokenized directly by the saved tokenizer (with
    its own special tokens) and followed by EOS; every document is in exactly one split."""
    from transformers import AutoTokenizer

    index = fmt.read_index(out)
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    streams = {s: split_tokens(out, s) for s in ("train", "val")}
    at, counts = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    for d in docs:
        ids = list(tok(d)["input_ids"])
        if ids[-1] != tok.eos_token_id:
            ids.append(tok.eos_token_id)
        for s in ("train", "val"):
            if list(streams[s][at[s]:at[s] + len(ids)]) == ids:
                at[s] += len(ids)
                counts[s] += 1
                break
        else:
            raise AssertionError(f"document {d[:30]!r} is in neither split")
    assert at == {s: len(streams[s]) for s in streams}
    assert counts == {s: index["splits"][s]["documents"] for s in counts} and min(counts.values()) >= 1
    assert index["max_token_id"] == max(int(streams["train"].max()), int(streams["val"].max()))
    assert index["tokenizer"]["sha256"] == fmt.tokenizer_sha256(out / "tokenizer")
    return streams


@pytest.mark.parametrize("source", ["jsonl", "parquet", "text", "disk"])
@pytest.mark.parametrize("tokenizer", ["bpe:300", "hf"])
def test_tokens_equal_a_direct_tokenization(corpus, tmp_path, source, tokenizer):
    docs, paths, hf_dir = corpus
    index = run([paths[source]], tmp_path / "out", hf_dir if tokenizer == "hf" else tokenizer, val_fraction=0.2)
    assert_direct_tokenization(tmp_path / "out", docs)
    assert index["dtype"] == "uint16" and index["vocab_size"] <= 400
    assert index["sources"][0]["path"] == str(paths[source].resolve()) and index["sources"][0]["bytes"] > 0
    if tokenizer == "hf":  # the tokenizer's own convention: BOS first; the files are copied, not re-serialized
        assert index["bos_id"] == 1 and split_tokens(tmp_path / "out", "train")[0] == 1
        assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_bytes() == \
            (hf_dir / "tokenizer.json").read_bytes()
    else:
        assert (index["vocab_size"], index["eos_id"], index["bos_id"]) == (300, 0, None)


def test_num_proc_chunking_and_shard_size_do_not_change_the_tokens(corpus, tmp_path, monkeypatch):
    docs, paths, hf_dir = corpus
    run([paths["jsonl"]], tmp_path / "a", hf_dir, val_fraction=0.2)
    # chunks of a few documents (one map() call each): the split is by global document index, not per chunk
    monkeypatch.setattr(build, "MIN_CHUNK_DOCS", 1)
    monkeypatch.setattr(build, "CHUNK_BYTES", 300)
    index = run([paths["jsonl"]], tmp_path / "b", hf_dir, val_fraction=0.2, num_proc=2, shard_tokens=100)
    assert len(index["splits"]["train"]["shards"]) > 3
    assert all(s["tokens"] <= 100 for s in index["splits"]["train"]["shards"])
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(tmp_path / "a", split), split_tokens(tmp_path / "b", split))
    fmt.verify_shards(tmp_path / "b", index)


def test_char_and_byte_tokenizers(corpus, tmp_path):
    docs, paths, _ = corpus
    index = run([paths["jsonl"]], tmp_path / "byte", "byte", val_fraction=0.2)
    assert (index["vocab_size"], index["eos_id"]) == (257, 256)
    streams = {s: split_tokens(tmp_path / "byte", s) for s in ("train", "val")}
    expected = b"".join(d.encode() + b"\x00" for d in docs)  # EOS (256) stands where the 0 bytes are
    got = np.concatenate([streams["train"], streams["val"]])
    assert len(got) == len(expected) and sorted(got.tolist()) == sorted(256 if b == 0 else b for b in expected)
    assert_direct_tokenization(tmp_path / "byte", docs)
    index = run([paths["text"]], tmp_path / "char", "char", val_fraction=0.2)
    assert index["vocab_size"] == len(set("".join(docs))) + 2  # <unk>, the characters, EOS
    assert_direct_tokenization(tmp_path / "char", docs)


def test_empty_and_undecodable_records_are_counted(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "fine text one"}\n{"text": ""}\n{"text": null}\n'
                                       b'{"text": "bad \xff\xfe bytes"}\n{"text": "more text"}\n')
    (tmp_path / "b.txt").write_bytes(b"para one\n\npara \xff two\n\npara three\n")
    index = run([tmp_path / "a.jsonl"], tmp_path / "o1", "byte", val_fraction=0.3)
    assert index["skipped"] == {"empty_records": 2, "undecodable_records": 1, "undecodable_bytes": 2}
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == 3
    tokens = np.concatenate([split_tokens(tmp_path / "o1", s) for s in ("train", "val")])
    assert sorted(tokens.tolist()).count(0xEF) == 2  # each bad byte became U+FFFD (EF BF BD)
    index = run([tmp_path / "b.txt"], tmp_path / "o2", "byte", val_fraction=0.3)
    assert index["skipped"] == {"empty_records": 0, "undecodable_records": 1, "undecodable_bytes": 1}


def test_text_document_format_reads_one_document_per_file(tmp_path):
    files = [tmp_path / "a.py", tmp_path / "b.py"]
    files[0].write_text("def f():\n    return 1\n\n\ndef g():\n    pass\n")
    files[1].write_text("x = 1\n\ny = 2\n")
    index = run([tmp_path / "*.py"], tmp_path / "out", "byte", format="text-document", val_fraction=0.5)
    assert [s["path"] for s in index["sources"]] == [str(f.resolve()) for f in files]
    tokens = np.concatenate([split_tokens(tmp_path / "out", s) for s in ("train", "val")])
    assert sorted(tokens.tolist()) == sorted([*files[0].read_bytes(), 256, *files[1].read_bytes(), 256])


def test_up_to_date_refused_and_overwrite(corpus, tmp_path):
    docs, paths, _ = corpus
    out = tmp_path / "out"
    first = run([paths["jsonl"]], out, "bpe:300")
    stamp = (out / "index.json").stat().st_mtime_ns
    lines = []
    again = prepare(Options([str(paths["jsonl"])], "bpe:300", str(out), progress=False), log=lines.append)
    assert "up to date" in lines[0] and again["created"] == first["created"]
    assert (out / "index.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError) as err:
        run([paths["jsonl"]], out, "bpe:280")
    assert err.value.where == "--out" and "tokenizer" in str(err.value) and "--overwrite" in str(err.value)
    with pytest.raises(DataError, match="inputs"):
        run([paths["jsonl"], paths["parquet"]], out, "bpe:300")
    replaced = run([paths["jsonl"]], out, "bpe:280", overwrite=True)
    assert replaced["vocab_size"] == 280 and fmt.read_index(out)["vocab_size"] == 280
    assert not list(tmp_path.glob(".out.*"))  # no temporary or old directory left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing"):  # not prepared data: never replaced, even with --overwrite
        run([paths["jsonl"]], tmp_path / "other", "byte", overwrite=True)


def _cli(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "dist_sparse.cli.main", "prepare-data", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_a_kill_during_writing_leaves_a_usable_state(corpus, tmp_path):
    docs, paths, _ = corpus
    out = tmp_path / "out"
    run([paths["jsonl"]], out, "byte", val_fraction=0.2)
    before = split_tokens(out, "train")
    # replacing it with other options: SIGKILL after the second shard, before the index is written
    proc = _cli([paths["jsonl"], "--tokenizer", "char", "--out", out, "--overwrite", "--shard-tokens", "50",
                 "--no-progress"], {"DIST_SPARSE_FAULT": "prepare_kill@2"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(tmp_path.glob(".out.tmp-*"))  # the killed run's partial shards are there, but not in out
    index = fmt.read_index(out)
    fmt.verify_shards(out, index)
    assert index["tokenizer"]["name"] == "byte" and np.array_equal(split_tokens(out, "train"), before)
    fresh = tmp_path / "fresh"
    proc = _cli([paths["jsonl"], "--tokenizer", "byte", "--out", fresh, "--shard-tokens", "50", "--no-progress"],
                {"DIST_SPARSE_FAULT": "prepare_kill@1"})
    assert proc.returncode == -9 and not fresh.exists()
    index = run([paths["jsonl"]], out, "char", overwrite=True, shard_tokens=50)  # the rerun completes
    assert index["tokenizer"]["name"] == "char" and not list(tmp_path.glob(".out.*"))
    assert_direct_tokenization(out, docs)


def test_bad_inputs_name_the_file_column_or_option(corpus, tmp_path):
    import datasets

    docs, paths, _ = corpus
    cases = []

    def expect(where, match, inputs, tokenizer="byte", **kw):
        with pytest.raises(DataError, match=match) as err:
            run(inputs, tmp_path / f"o{len(cases)}", tokenizer, **kw)
        assert err.value.where == str(where), err.value
        cases.append(where)

    expect(tmp_path / "none*.jsonl", "no files match", [tmp_path / "none*.jsonl"])
    expect(tmp_path / "missing.jsonl", "no files match", [tmp_path / "missing.jsonl"])
    (tmp_path / "data.xyz").write_text("x")
    expect(tmp_path / "data.xyz", "unknown format", [tmp_path / "data.xyz"])
    expect("--format", "unknown format", [paths["jsonl"]], format="yaml")
    expect(paths["jsonl"].resolve(), r"no column 'body' \(columns: text, id\)", [paths["jsonl"]], text_column="body")
    expect(paths["parquet"].resolve(), "column 'id' holds", [paths["parquet"]], text_column="id")
    (tmp_path / "empty_tok").mkdir()
    (tmp_path / "empty_tok" / "README").write_text("no tokenizer here")
    expect("--tokenizer", "holds no tokenizer files", [paths["jsonl"]], tokenizer=tmp_path / "empty_tok")
    expect("--tokenizer", "not char, byte, bpe:N", [paths["jsonl"]], tokenizer="gpt2")
    expect("--tokenizer", "too large for uint32", [paths["jsonl"]], tokenizer=f"bpe:{(1 << 32) + 1}")
    expect("--dtype", "too large for uint16", [paths["jsonl"]], tokenizer=big_vocab_tokenizer(tmp_path),
           dtype="uint16")
    expect("--val-fraction", "must be in", [paths["jsonl"]], val_fraction=1.0)
    expect("--num-proc", "must be >= 1", [paths["jsonl"]], num_proc=0)
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(dd))
    expect(dd.resolve(), "DatasetDict with splits train", [dd], format="disk")
    assert not any((tmp_path / f"o{i}").exists() for i in range(len(cases)))


def big_vocab_tokenizer(root: Path) -> Path:
    """A word-level tokenizer with 70000 ids (more than uint16 holds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = root / "big_tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(str(out))
    return out


def test_uint32_when_the_vocabulary_needs_it(corpus, tmp_path):
    docs, paths, _ = corpus
    index = run([paths["jsonl"]], tmp_path / "out", big_vocab_tokenizer(tmp_path))
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70_002
    assert (tmp_path / "out" / "train_00000.bin").stat().st_size == 4 * index["splits"]["train"]["tokens"]


# --------------------------------------------------------------------------------------------------------------
# reading and sampling


def test_index_tampering_is_a_config_error(corpus, tmp_path):
    docs, paths, _ = corpus
    out = tmp_path / "out"
    run([paths["jsonl"]], out, "byte")
    index = json.loads((out / "index.json").read_text())
    with open(out / "train_00000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ConfigError, match="train_00000.bin has") as err:
        fmt.read_index(out)
    assert err.value.key == "data.prepared"
    index["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="bad shard file name"):
        fmt.read_index(out)
    with pytest.raises(ConfigError, match="no index.json"):
        fmt.read_index(tmp_path)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 4097])
def test_permutation_is_a_bijection_per_epoch(n):
    perms = [S.permute(np.arange(n), n, seed=3, epoch=e) for e in range(3)]
    for p in perms:
        assert np.array_equal(np.sort(p), np.arange(n))
    if n >= 64:
        assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[0], np.arange(n))
        assert not np.array_equal(perms[0], S.permute(np.arange(n), n, seed=4, epoch=0))


class FakeData:
    def __init__(self, n_tokens):
        self.ids = np.arange(n_tokens, dtype=np.int64)

    def train_tokens(self):
        return len(self.ids)

    def read_train(self, start, length):
        return self.ids[start:start + length]


def windows_of(sampler, step, rank, micro):
    return (sampler.starts(step, rank, micro) // sampler.block_size).tolist()


def test_epoch_sampling_each_window_once_no_overlap_world_size_independent():
    data, block = FakeData(100 * 8 + 5), 8  # W = 100 windows (the 5 trailing tokens are never read)
    two = S.WindowSampler(data, "epoch", block, seed=7, world=2, micro_batch=3, accum=2)  # G = 12
    one = S.WindowSampler(data, "epoch", block, seed=7, world=1, micro_batch=3, accum=4)  # same G, 1 rank
    seen, by_rank = [], {}  # (epoch, rank) -> windows
    for step in range(25):  # 300 positions: exactly 3 epochs
        for m in range(2):
            for r in range(2):
                # rank r, micro-batch m on 2 ranks reads what micro-batch 2m + r reads on 1 rank
                assert windows_of(two, step, r, m) == windows_of(one, step, 0, 2 * m + r)
                for w in windows_of(two, step, r, m):
                    by_rank.setdefault((len(seen) // 100, r), []).append(w)
                    seen.append(w)
        x = two.batch(step, 0, 0)
        assert x.shape == (3, block) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(3, block - 1, dtype=torch.long))
    epochs = [seen[i * 100:(i + 1) * 100] for i in range(3)]
    for e in range(3):
        assert sorted(epochs[e]) == list(range(100))  # each window exactly once per epoch
        assert not set(by_rank[(e, 0)]) & set(by_rank[(e, 1)])  # split across ranks without overlap
    assert epochs[0] != epochs[1]
    assert two.tokens_seen(25) == 25 * 12 * block and two.epochs(25) == 3.0


def test_epoch_sampling_resume_on_another_global_batch_continues_the_position():
    data = FakeData(64 * 4)
    a = S.WindowSampler(data, "epoch", 4, seed=1, world=2, micro_batch=2, accum=1)  # G = 4
    order = [w for s in range(16) for r in range(2) for w in windows_of(a, s, r, 0)]
    state = json.loads(json.dumps(a.state_dict(5)))  # as in a checkpoint's trainer.json
    assert state["position"] == 20 and state["tokens_seen"] == 80
    b = S.WindowSampler(data, "epoch", 4, seed=1, world=1, micro_batch=8, accum=1)  # G = 8
    b.load_state_dict(state, 5)
    resumed = [w for s in range(5, 10) for w in windows_of(b, s, 0, 0)]
    assert resumed == order[20:60]
    assert b.tokens_seen(10) == 80 + 5 * 8 * 4 and b.epochs(10) == 60 / 64


def test_random_sampling_is_the_text_loaders_rule():
    from dist_sparse.config import DataConfig
    from dist_sparse.data import TextData

    data = TextData(DataConfig(max_chars=20000), block_size=16, seed=3)
    s = S.WindowSampler(data, "random", 16, seed=3, world=2, micro_batch=4, accum=1)
    for step, rank, micro in ((0, 0, 0), (5, 1, 0), (9, 0, 2)):
        assert torch.equal(s.batch(step, rank, micro), data.batch("train", step, rank, micro, 4))


# --------------------------------------------------------------------------------------------------------------
# config checks and eval


def tiny_checkpoint(root: Path, vocab: int, positions: int = 64, tokenizer_from: Path | None = None) -> Path:
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=16, n_layer=1, n_head=2))
    out = root / f"ckpt_{vocab}_{positions}"
    model.save_pretrained(str(out))
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            shutil.copyfile(f, out / f.name)
    return out


def load_cfg(**sets):
    from dist_sparse import config as C

    return C.load(None, [f"{k}={v}" for k, v in sets.items()])


def test_config_precedence_and_model_checks(corpus, tmp_path):
    docs, paths, hf_dir = corpus
    out = tmp_path / "prep"
    index = run([paths["jsonl"]], out, hf_dir)
    cfg = load_cfg(**{"data.prepared": out, "data.sampling": "epoch"})
    assert cfg.data.prepared == str(out) and cfg.data.sampling == "epoch"
    from dist_sparse import config as C

    assert C.load(ROOT / "configs" / "prepared.yaml", [f"data.prepared={out}"]).data.prepared == str(out)
    for key, value in (("data.path", paths["text"]), ("data.tokenizer", "char"), ("data.val_fraction", 0.2),
                       ("data.max_chars", 5000)):
        with pytest.raises(ConfigError) as err:
            load_cfg(**{"data.prepared": out, key: value})
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        load_cfg(**{"data.prepared": tmp_path / "nothing"})
    assert err.value.key == "data.prepared"
    with pytest.raises(ConfigError) as err:
        load_cfg(**{"data.sampling": "shuffle"})
    assert err.value.key == "data.sampling"
    # model.pretrained: the embedding must hold the ids, the tokenizer must be the data's, the context must fit
    small = tiny_checkpoint(tmp_path, vocab=index["max_token_id"])
    with pytest.raises(ConfigError, match="model.pretrained") as err:
        load_cfg(**{"data.prepared": out, "model.pretrained": small, "model.block_size": 32})
    assert err.value.key == "data.prepared" and "embedding" in str(err.value)
    other = tiny_checkpoint(tmp_path, vocab=512)
    (other / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text().replace("</s>", "</S>"))
    with pytest.raises(ConfigError, match="tokenizer sha256") as err:
        load_cfg(**{"data.prepared": out, "model.pretrained": other, "model.block_size": 32})
    assert err.value.key == "data.prepared" and "model.pretrained" in str(err.value)
    good = tiny_checkpoint(tmp_path, vocab=512, positions=32, tokenizer_from=out / "tokenizer")
    load_cfg(**{"data.prepared": out, "model.pretrained": good, "model.block_size": 32})
    with pytest.raises(ConfigError, match="exceeds the 32 positions") as err:
        load_cfg(**{"data.prepared": out, "model.pretrained": good, "model.block_size": 64})
    assert err.value.key == "model.block_size"


def test_eval_on_prepared_data(corpus, tmp_path):
    from dist_sparse.oneshot.eval import evaluate_checkpoint

    docs, paths, hf_dir = corpus
    out = tmp_path / "prep"
    index = run([paths["jsonl"]], out, hf_dir, val_fraction=0.3)
    ckpt = tiny_checkpoint(tmp_path, vocab=512, tokenizer_from=out / "tokenizer")
    result = evaluate_checkpoint(ckpt, None, seqlen=16, prepared=out, device="cpu")
    n_val = index["splits"]["val"]["tokens"]
    assert result["split"] == "val" and result["windows"] == n_val // 16 and result["tokens"] == (n_val // 16) * 15
    assert np.isfinite(result["perplexity"]) and result["perplexity"] > 1
    train = evaluate_checkpoint(ckpt, None, seqlen=16, prepared=out, split="train", max_tokens=64, device="cpu")
    assert train["windows"] == 4
    small = tiny_checkpoint(tmp_path, vocab=index["max_token_id"])
    with pytest.raises(ConfigError, match="beyond the .*-row embedding") as err:
        evaluate_checkpoint(small, None, seqlen=16, prepared=out, device="cpu")
    assert err.value.key == "--prepared"
    other = tiny_checkpoint(tmp_path, vocab=512, positions=48)
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer sha256 differs") as err:
        evaluate_checkpoint(other, None, seqlen=16, prepared=out, device="cpu")
    assert err.value.key == "--prepared"
    from dist_sparse.cli.evaluate import main

    with pytest.raises(SystemExit):  # --data and --prepared exclude each other
        main([str(ckpt), "--prepared", str(out), "--data", str(paths["text"])])


# --------------------------------------------------------------------------------------------------------------
# training (2 ranks) and a resume on 1 rank


def read_trace(directory: Path) -> dict:
    """(step, rank, micro) -> window starts, from every rank's trace file."""
    out = {}
    for f in directory.glob("rank_*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[(r["step"], r["rank"], r["micro"])] = r["starts"]
    return out


@pytest.mark.slow
def test_train_two_ranks_epoch_sampling_then_resume_on_one_rank(tmp_path, monkeypatch):
    from tests.distributed_utils import dist_sparse_train

    docs = documents(12)
    paths = write_inputs(tmp_path / "in", docs)
    prep = tmp_path / "prep"
    index = run([paths["jsonl"]], prep, "char", val_fraction=0.25)
    block, micro, steps = 16, 4, 12
    n_windows = index["splits"]["train"]["tokens"] // block
    common = ["data.tokenizer=null", "data.max_chars=null", f"data.prepared={prep}", "data.sampling=epoch",
              "model.n_layer=1", "model.n_embd=32", "model.n_head=2", f"model.block_size={block}",
              f"train.steps={steps}", "train.save_interval=6", "train.eval_interval=100", "train.eval_batches=2",
              "train.progress=false", "train.tensorboard=false", f"deepspeed.train_micro_batch_size_per_gpu={micro}",
              "deepspeed.zero_optimization.stage=2", "sparsity.method=rigl", "sparsity.update_interval=4"]
    monkeypatch.setenv("DIST_SPARSE_DATA_TRACE", str(tmp_path / "trace2"))
    dist_sparse_train(tmp_path / "run2", common, nproc=2)
    g = 2 * micro  # global batch
    assert steps * g > n_windows  # the run crosses an epoch boundary
    trace = read_trace(tmp_path / "trace2")
    order = [w // block for s in range(steps) for r in range(2) for w in trace[(s, r, 0)]]
    full = len(order) // n_windows
    for e in range(full):  # every window exactly once per epoch
        assert sorted(order[e * n_windows:(e + 1) * n_windows]) == list(range(n_windows))
    assert len(set(order[full * n_windows:])) == len(order) - full * n_windows  # the open epoch repeats none
    assert order[:n_windows] != order[n_windows:2 * n_windows]  # each epoch in its own order
    for e in range(full):  # within an epoch, ranks never share a window
        rank_of = [r for s in range(steps) for r in range(2) for _ in trace[(s, r, 0)]][e * n_windows:]
        epoch = list(zip(order[e * n_windows:(e + 1) * n_windows], rank_of))
        assert not {w for w, r in epoch if r == 0} & {w for w, r in epoch if r == 1}
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["tokens_seen"] == steps * g * block
    assert summary["data_epochs"] == pytest.approx(steps * g / n_windows)
    assert summary["world_size"] == 2 and np.isfinite(summary["final_val_loss"])
    ckpt = tmp_path / "run2" / "checkpoints" / "step_00000006"
    saved = json.loads((ckpt / "trainer.json").read_text())["data"]
    assert saved["position"] == 6 * g and saved["tokens_seen"] == 6 * g * block
    # resume at step 6 on 1 rank with 2 accumulation steps (same global batch): the same windows, step by step
    monkeypatch.setenv("DIST_SPARSE_DATA_TRACE", str(tmp_path / "trace1"))
    dist_sparse_train(tmp_path / "run1", [*common, "deepspeed.gradient_accumulation_steps=2"], resume=ckpt)
    resumed = read_trace(tmp_path / "trace1")
    assert sorted({k[0] for k in resumed}) == list(range(6, steps))
    for s in range(6, steps):
        for r in range(2):
            assert resumed[(s, 0, r)] == trace[(s, r, 0)]
    again = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert again["tokens_seen"] == summary["tokens_seen"] and again["data_epochs"] == summary["data_epochs"]
    assert again["world_size"] == 1
    from transformers import AutoTokenizer

    final = tmp_path / "run2" / "final"
    assert fmt.tokenizer_sha256(final) == index["tokenizer"]["sha256"]
    assert len(AutoTokenizer.from_pretrained(str(final))) == index["vocab_size"]
