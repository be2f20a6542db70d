"""`dist-sparse prepare-data INPUT... --tokenizer TOK --out DIR`: tokenize a corpus into memory-mappable shards.

See docs/data.md for the format (``index.json``) and the choices behind it.
"""

import argparse
import os
import sys

from dist_sparse.errors import DistSparseError


def build_parser() -> argparse.ArgumentParser:
    from dist_sparse.prepared.build import DEFAULT_SHARD_TOKENS, FORMATS

    p = argparse.ArgumentParser(
        prog="dist-sparse prepare-data",
        description="Tokenize text corpora (plain text, jsonl/json, parquet, csv, or a datasets save_to_disk "
                    "directory; read through Hugging Face datasets) into token shards plus index.json, for "
                    "data.prepared. One record is one document; documents are followed by EOS and split into "
                    "train/val by a seeded hash. Nothing is downloaded.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, globs or directories")
    p.add_argument("--tokenizer", required=True, metavar="TOK",
                   help="a local Hugging Face tokenizer directory, char, byte, or bpe:N (train a byte-level BPE "
                        "with N ids on the training documents; saved beside the data)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--text-column", default="text",
                   help="the text column of jsonl/json, parquet, csv and save_to_disk inputs (default: text)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="auto (by extension: .jsonl/.json json, .parquet, .csv, .txt/.md text; a directory "
                        "with state.json is a save_to_disk dataset), or one format for every input; text = one "
                        "document per blank-line separated paragraph, text-document = one per file (read whole)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents in the validation split (default 0.01; each split gets at least "
                        "one document)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer processes (Dataset.map num_proc; default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace prepared data in DIR that came from other inputs or options")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                   help="token id type (default auto: uint16 when the vocabulary has at most 65536 ids)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    # before datasets/transformers are imported: nothing may be downloaded
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from dist_sparse.prepared.build import Options, prepare

    opts = Options(inputs=args.inputs, tokenizer=args.tokenizer, out=args.out, text_column=args.text_column,
                   format=args.format, val_fraction=args.val_fraction, num_proc=args.num_proc, seed=args.seed,
                   overwrite=args.overwrite, dtype=args.dtype, shard_tokens=args.shard_tokens,
                   progress=not args.no_progress)
    try:
        prepare(opts)
    except DistSparseError as exc:
        print(f"dist-sparse prepare-data: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
