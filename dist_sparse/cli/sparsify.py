"""`dist-sparse sparsify MODEL_DIR --method {magnitude,wanda,sparsegpt} (--sparsity S | --pattern N:M)
--calib TEXT_OR_DATASET [--samples 128] [--seqlen 512] --out OUT_DIR [--nproc N]`."""

import argparse
import json
import sys

from dist_sparse.errors import DistSparseError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-sparse sparsify",
        description="One-shot prune a Hugging Face checkpoint (magnitude, Wanda or SparseGPT; unstructured or N:M), "
                    "layer by layer with data-parallel calibration. See docs/oneshot.md.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, metavar="S", help="unstructured sparsity in [0, 1), e.g. 0.5")
    target.add_argument("--pattern", metavar="N:M", help="semi-structured: keep N of every M weights, e.g. 2:4")
    p.add_argument("--calib", metavar="TEXT_OR_DATASET",
                   help="calibration text file, or a `datasets` directory (save_to_disk) with a text column; "
                        "required for wanda and sparsegpt")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output checkpoint directory")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel calibration ranks to spawn (ignored under torchrun/deepspeed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening, fraction of mean Hessian diagonal")
    p.add_argument("--include", metavar="REGEX", help="prune only layers whose module name matches (re.search)")
    p.add_argument("--exclude", metavar="REGEX", help="leave dense the layers whose module name matches")
    p.add_argument("--text-column", help="text column of a dataset directory (default: 'text' or the first)")
    p.add_argument("--device", help="cpu, cuda or cuda:K (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--no-compressed", dest="compressed", action="store_false",
                   help="skip the compressed-tensors export in OUT_DIR/compressed")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dist_sparse.oneshot.pipeline import SparsifyOptions, sparsify_checkpoint

    opts = SparsifyOptions(
        model_dir=args.model_dir, out=args.out, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        calib=args.calib, samples=args.samples, seqlen=args.seqlen, nproc=args.nproc, seed=args.seed,
        batch_size=args.batch_size, blocksize=args.blocksize, damp=args.damp, include=args.include,
        exclude=args.exclude, text_column=args.text_column, device=args.device, overwrite=args.overwrite,
        compressed=args.compressed, progress=args.progress)
    try:
        report = sparsify_checkpoint(opts)
    except DistSparseError as exc:
        print(f"dist-sparse sparsify: error: {exc}", file=sys.stderr)
        return 2
    summary = {"out": args.out, "method": args.method, "sparsity": report["sparsity"],
               "layers": len(report["layer_sparsity"]), "world_size": report["world_size"],
               "calibration_seconds": report["calibration_seconds"], "wall_seconds": report["wall_seconds"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
