"""Prepared-data figures: `dist-sparse prepare-data` throughput and memory, and training from prepared data.

Corpus: the running interpreter's standard library sources (every `*.py` outside site-packages, sorted), one jsonl
record per file, the file list cycled until the corpus reaches the target size (about 100 MB; one run on at least
500 MB). Built under bench/work/data/ (ignored by git). Nothing is downloaded.

1. prepare-data on the ~100 MB corpus with `bpe:8192` (the BPE is trained on the training documents first; its
   time is reported apart) and with that tokenizer saved (the prepared directory's `tokenizer/`, as a user's
   local Hugging Face tokenizer), each with `--num-proc 1` and `2`: tokens/s of the tokenizing and writing phase,
   wall time, and the peak resident memory of the whole process tree (sampled every 0.2 s). Then the saved
   tokenizer on the >= 500 MB corpus with 2 processes.
2. Training from prepared data (`dist-sparse train --nproc 2`, GPT-2 4 x 128, context 128, batch 8 per rank,
   ZeRO-2, RigL 90%, `data.sampling: epoch`): the loader's batch fetch per step timed directly in the training
   loop (`summary.json`'s `median_data_fetch_seconds`) against the median step; and the anonymous (not
   file-backed) resident memory (`rss_anon_mb`, RssAnon from /proc/self/status, max over ranks, at the end) with
   a corpus 1/10 the size and with the ~100 MB one.

Every timing carries the machine's load average (os.getloadavg) at its start and end: the machine is shared.
Resumable: a finished run whose configuration (command, corpus sizes) equals this one's is reused from
bench/work/data/results.json, and the section says which rows were.

    python bench/bench_data.py [--base-mb 100] [--big-mb 500] [--train-steps 100]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import command_line, machine_line, write_section  # noqa: E402
from dist_sparse.prepared.format import tokenizer_sha256  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "data"
RESULTS = WORK / "results.json"
CLI = [sys.executable, "-m", "dist_sparse.cli.main"]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

TRAIN = ["data.tokenizer=null", "data.max_chars=null", "data.sampling=epoch", "model.n_layer=4", "model.n_head=4",
         "model.n_embd=128", "model.block_size=128", "deepspeed.train_micro_batch_size_per_gpu=8",
         "deepspeed.zero_optimization.stage=2", "train.seed=0", "train.eval_batches=10", "train.progress=false",
         "train.save_final_model=false", "train.tensorboard=false", "sparsity.method=rigl", "sparsity.sparsity=0.9",
         "sparsity.distribution=erk", "sparsity.update_interval=50"]


def load() -> list:
    return os.getloadavg()[0]


def stdlib_files() -> list:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def build_corpus(name: str, megabytes: float) -> dict:
    """``WORK/name.jsonl``: stdlib files cycled to ``megabytes`` (MB of text); reused when already built."""
    path = WORK / f"{name}.jsonl"
    meta = WORK / f"{name}.json"
    want = {"target_mb": megabytes, "python": sysconfig.get_python_version()}
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("want") == want:
        return json.loads(meta.read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    files, written, docs, copy = stdlib_files(), 0, 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while written < megabytes * 1e6:
            for p in files:
                try:
                    text = p.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                line = json.dumps({"text": text, "path": str(p.relative_to(root)),
                                   "copy": copy}) + "\n"
                f.write(line)
                written += len(text.encode())
                docs += 1
                if written >= megabytes * 1e6:
                    break
            copy += 1
    os.replace(tmp, path)
    info = {"want": want, "path": str(path), "text_bytes": written, "file_bytes": path.stat().st_size,
            "documents": docs}
    meta.write_text(json.dumps(info))
    return info


def tree_rss(proc) -> float:
    import psutil

    try:
        p = psutil.Process(proc.pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run_measured(cmd: list) -> dict:
    """Run ``cmd``; wall time, peak RSS of the process tree, load averages."""
    load0, t0 = load(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err[-4000:]}\n{out[-2000:]}")
    return {"wall_seconds": time.perf_counter() - t0, "peak_tree_rss_mb": peak, "load_start": load0,
            "load_end": load(), "stdout": out.strip().splitlines()[-1] if out.strip() else ""}


def cached(results: dict, key: str, config: dict, check) -> dict | None:
    found = results.get(key)
    if found is not None and found.get("config") == config and check(found):
        found["reused"] = True
        return found
    return None


def save(results: dict) -> None:
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, RESULTS)


def prepare_run(results: dict, key: str, corpus: dict, tokenizer: str, nproc: int) -> dict:
    out = WORK / "prepared" / key
    config = {"corpus": corpus["want"], "corpus_bytes": corpus["file_bytes"], "tokenizer": tokenizer,
              "num_proc": nproc}
    def still_valid(r) -> bool:
        """The run's output is still there, and a tokenizer directory still holds the tokenizer it used."""
        if not (out / "index.json").is_file():
            return False
        index = json.loads((out / "index.json").read_text())
        if Path(tokenizer).is_dir() and index["tokenizer"]["sha256"] != tokenizer_sha256(tokenizer):
            return False
        return index["created"] == r["index"]["created"]

    found = cached(results, key, config, still_valid)
    if found:
        print(f"{key}: reused", flush=True)
        return found
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: an up-to-date directory would measure nothing
    cmd = [*CLI, "prepare-data", corpus["path"], "--tokenizer", tokenizer, "--out", str(out), "--num-proc",
           str(nproc), "--no-progress"]
    measured = run_measured(cmd)
    index = json.loads((out / "index.json").read_text())
    row = {"config": config, "command": "dist-sparse " + " ".join(map(str, cmd[3:])), **measured,
           "index": {k: index[k] for k in ("created", "vocab_size", "dtype", "stats", "skipped")},
           "documents": sum(index["splits"][s]["documents"] for s in ("train", "val")),
           "tokens": sum(index["splits"][s]["tokens"] for s in ("train", "val")), "reused": False}
    results[key] = row
    save(results)
    print(f"{key}: {row['tokens']:,} tokens, {index['stats']['tokens_per_second'] / 1e3:.0f}k tokens/s, "
          f"peak RSS {measured['peak_tree_rss_mb']:.0f} MB, {measured['wall_seconds']:.0f} s", flush=True)
    return row


def train_run(results: dict, key: str, prepared: Path, steps: int) -> dict:
    out = WORK / "train" / key
    sets = [*TRAIN, f"data.prepared={prepared}", f"train.steps={steps}", f"train.eval_interval={steps}",
            f"train.log_interval={steps}", f"train.output_dir={out}"]
    created = json.loads((prepared / "index.json").read_text())["created"]
    config = {"sets": sets, "prepared_created": created}
    found = cached(results, key, config, lambda r: (out / "summary.json").is_file())
    if found:
        print(f"{key}: reused", flush=True)
        return found
    cmd = [*CLI, "train", str(ROOT / "configs" / "demo.yaml"), "--nproc", "2"]
    for s in sets:
        cmd += ["--set", s]
    measured = run_measured(cmd)
    summary = json.loads((out / "summary.json").read_text())
    keep = ("median_step_seconds", "median_data_fetch_seconds", "rss_anon_mb", "peak_rss_mb", "tokens_seen",
            "data_epochs", "final_val_loss", "data")
    row = {"config": config, **{k: summary[k] for k in keep}, **measured, "reused": False}
    results[key] = row
    save(results)
    print(f"{key}: fetch {row['median_data_fetch_seconds'] * 1e6:.0f} us, step "
          f"{row['median_step_seconds'] * 1e3:.0f} ms, RssAnon {row['rss_anon_mb']:.0f} MB", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-mb", type=float, default=100.0)
    parser.add_argument("--big-mb", type=float, default=500.0)
    parser.add_argument("--train-steps", type=int, default=100)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    base = build_corpus("stdlib_base", args.base_mb)
    small = build_corpus("stdlib_small", args.base_mb / 10)
    big = build_corpus("stdlib_big", args.big_mb)

    rows = [prepare_run(results, "bpe8192_p1", base, "bpe:8192", 1)]
    tok = WORK / "prepared" / "bpe8192_p1" / "tokenizer"  # the trained BPE, now a saved Hugging Face tokenizer
    saved = WORK / "tokenizer_bpe8192"
    if not (saved / "tokenizer.json").is_file() or (saved / "tokenizer.json").read_bytes() != \
            (tok / "tokenizer.json").read_bytes():
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(tok, saved)
    rows.append(prepare_run(results, "bpe8192_p2", base, "bpe:8192", 2))
    rows.append(prepare_run(results, "saved_p1", base, str(saved), 1))
    rows.append(prepare_run(results, "saved_p2", base, str(saved), 2))
    rows.append(prepare_run(results, "saved_small_p2", small, str(saved), 2))
    rows.append(prepare_run(results, "saved_big_p2", big, str(saved), 2))
    b, sm, bg = f"~{args.base_mb:g} MB", f"~{args.base_mb / 10:g} MB", f">= {args.big_mb:g} MB"
    labels = [f"{b}, bpe:8192, 1 process", f"{b}, bpe:8192, 2 processes", f"{b}, saved tokenizer, 1 process",
              f"{b}, saved tokenizer, 2 processes", f"{sm}, saved tokenizer, 2 processes",
              f"{bg}, saved tokenizer, 2 processes"]
    corpora = [base, base, base, base, small, big]

    t_small = train_run(results, "train_small", WORK / "prepared" / "saved_small_p2", args.train_steps)
    t_base = train_run(results, "train_base", WORK / "prepared" / "saved_p2", args.train_steps)

    def prow(label, r, c):
        st = r["index"]["stats"]
        bpe = f"{st['tokenizer_seconds']:.0f}" if r["config"]["tokenizer"].startswith("bpe") else "-"
        return (f"| {label}{' (reused)' if r.get('reused') else ''} | {c['file_bytes'] / 1e6:.0f} | "
                f"{r['documents']:,} | {r['tokens']:,} | {st['tokens_per_second'] / 1e3:,.0f}k | {bpe} | "
                f"{r['wall_seconds']:.0f} | {r['peak_tree_rss_mb']:,.0f} | {r['load_start']:.1f} / "
                f"{r['load_end']:.1f} |")

    fetch_ratio = t_base["median_data_fetch_seconds"] / t_base["median_step_seconds"]
    fetch_ratio_small = t_small["median_data_fetch_seconds"] / t_small["median_step_seconds"]
    anon_ratio = t_base["rss_anon_mb"] / t_small["rss_anon_mb"]
    token_ratio = rows[3]["tokens"] / rows[4]["tokens"]
    speedup_saved = rows[3]["index"]["stats"]["tokens_per_second"] / rows[2]["index"]["stats"]["tokens_per_second"]
    reused = [k for k, r in results.items() if r.get("reused")]
    md = [
        "## Prepared data: `dist-sparse prepare-data` and training from memory-mapped shards",
        "",
        f"Command: `{command_line()}` (each prepare-data row is the `dist-sparse prepare-data ... --no-progress` "
        "command in bench/work/data/results.json; each training row `dist-sparse train configs/demo.yaml --nproc 2 "
        "--set ...` with the overrides in `bench/bench_data.py`).",
        f"Machine: {machine_line()}; shared with other jobs: the load average (1 min) at the start and end of every "
        "run is in its row.",
        ("Reused from an earlier run of this command with the same configuration (not re-run): "
         + ", ".join(f"`{k}`" for k in reused) + ".") if reused else "Every row was run by this command.",
        "",
        f"Corpus: the Python {sysconfig.get_python_version()} standard library's `*.py` files (outside "
        "site-packages), one jsonl record per file, the file list cycled until the target size. `bpe:8192` trains "
        "a byte-level BPE on the training documents first (its seconds are apart from tokens/s); \"saved "
        "tokenizer\" is that BPE saved as a Hugging Face tokenizer directory and passed as `--tokenizer DIR`. "
        "tokens/s: the tokenizing and writing phase (index.json's `stats`); peak RSS: the whole process tree "
        "(main process + map workers), sampled every 0.2 s; each process's RSS is summed, so pages the forked "
        "workers share with the main process count once per process (an upper bound).",
        "",
        "| run | corpus (MB) | documents | tokens | tokens/s | BPE training (s) | wall (s) | peak RSS (MB) | "
        "load start / end |",
        "|---|---|---|---|---|---|---|---|---|",
        *[prow(label, r, c) for label, r, c in zip(labels, rows, corpora)],
        "",
        f"Two processes vs one with the saved tokenizer: {speedup_saved:.2f}x tokens/s (on 2 cores shared with "
        "other jobs, see the load column).",
        "",
        f"Training from prepared data ({args.train_steps} steps, 2 ranks, ZeRO-2, RigL 90%, GPT-2 4 x 128, "
        "context 128, batch 8 per rank, `data.sampling: epoch`): the batch fetch is timed around "
        "`WindowSampler.batch` in the training loop (rank 0, median over steps); RssAnon is the anonymous resident "
        "memory at the end of the run, max over ranks (the shards are file-backed memory maps and do not count).",
        "",
        "| prepared corpus | train tokens | median fetch (us) | median step (ms) | fetch / step | RssAnon (MB) | "
        "peak RSS (MB) | final val loss | load start / end |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {name} | {r['data'].split('(')[1].split(' train')[0]} | {r['median_data_fetch_seconds'] * 1e6:.0f} | "
          f"{r['median_step_seconds'] * 1e3:.0f} | {r['median_data_fetch_seconds'] / r['median_step_seconds']:.4%} "
          f"| {r['rss_anon_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['final_val_loss']:.3f} | "
          f"{r['load_start']:.1f} / {r['load_end']:.1f} |"
          for name, r in ((sm + (" (reused)" if t_small.get("reused") else ""), t_small),
                          (b + (" (reused)" if t_base.get("reused") else ""), t_base))],
        "",
        "| target | reached | measured |",
        "|---|---|---|",
        f"| batch fetch <= 1% of the step | {'yes' if max(fetch_ratio, fetch_ratio_small) <= 0.01 else 'NO'} | "
        f"{fetch_ratio:.4%} ({b}), {fetch_ratio_small:.4%} ({sm}) |",
        f"| RssAnon with a 10x larger corpus <= 1.02x | {'yes' if anon_ratio <= 1.02 else 'NO'} | "
        f"{anon_ratio:.4f}x ({token_ratio:.1f}x the tokens) |",
        "| end to end: prepare-data bpe:8192, dense vs RigL 90% from a `model.config` Llama config | see below | "
        "its own section, `bench/bench_pretrain.py` |",
    ]
    write_section("70_data", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
