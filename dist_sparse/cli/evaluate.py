"""`dist-sparse eval MODEL_DIR (--data TEXT | --prepared DIR) [--seqlen 512]`: prints JSON with `perplexity` and
`sparsity`."""

import argparse
import json
import sys

from dist_sparse.errors import DistSparseError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-sparse eval",
        description="Perplexity (causal LMs; strided windows as in the SparseGPT/Wanda evaluations) and weight "
                    "sparsity of a Hugging Face checkpoint. Prints one JSON object.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="TEXT",
                        help="evaluation text file, or a `datasets` directory (save_to_disk) with a text column")
    source.add_argument("--prepared", metavar="DIR",
                        help="a dist-sparse prepare-data directory (its tokens, memory-mapped; see --split)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="split of --prepared (default val)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, help="window start every STRIDE tokens (default: --seqlen, no overlap)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    p.add_argument("--text-column", help="text column of a dataset directory (default: 'text' or the first)")
    p.add_argument("--device", help="cpu, cuda or cuda:K (default: cuda if available)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dist_sparse.oneshot.eval import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(args.model_dir, args.data, seqlen=args.seqlen, stride=args.stride,
                                     batch_size=args.batch_size, max_tokens=args.max_tokens,
                                     text_column=args.text_column, device=args.device, prepared=args.prepared,
                                     split=args.split)
    except DistSparseError as exc:
        print(f"dist-sparse eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
