"""`dist-sparse` command line: one sub-command per module, imported only when used (start-up stays fast)."""

import importlib
import sys

# sub-command -> module with `main(argv) -> int`
COMMANDS = {
    "train": ("dist_sparse.cli.train", "train a model sparse under DeepSpeed"),
    "sparsify": ("dist_sparse.cli.sparsify", "one-shot sparsify a Hugging Face checkpoint"),
    "eval": ("dist_sparse.cli.evaluate", "perplexity and sparsity of a checkpoint"),
    "plan": ("dist_sparse.cli.plan", "predicted per-rank training-state bytes (before launching)"),
    "prepare-data": ("dist_sparse.cli.prepare_data", "tokenize a corpus into memory-mapped shards (data.prepared)"),
    "lottery": ("dist_sparse.cli.lottery", "lottery tickets: iterative magnitude pruning with rewinding"),
    "report": ("dist_sparse.cli.report", "draw loss curves, densities, churn and lottery rounds of runs (PNG)"),
}


def _usage() -> str:
    lines = ["usage: dist-sparse COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dist-sparse: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
