"""What every rank checks right after the process group starts, before any model is built: where it runs (logged
once per rank, and summarised as ``nodes`` / ``ranks_per_node`` in summary.json), that every rank resolved the same
config and runs the same install, and, when the job spans nodes, that the checkpoint directory is one they share.

A mixed job fails at once on every rank with an error naming the first differing key (or version) and the hosts:
the verdict comes from one all-gather that every rank reads, so no rank is left waiting in a later collective.
"""

import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from dist_sparse import distributed as D
from dist_sparse.errors import DistSparseError


class PreflightError(DistSparseError, RuntimeError):
    """The ranks of one job disagree (config, install) or cannot share the checkpoint directory."""


PROBE_DIR = ".dist_sparse_probe"


def host_name() -> str:
    """How this rank names its host: the hostfile's name when one of our launchers started it (DIST_SPARSE_HOST),
    the launcher's name for the node under PMIx (mpirun), else the hostname."""
    return os.environ.get("DIST_SPARSE_HOST") or os.environ.get("PMIX_HOSTNAME") or socket.gethostname()


def discovery_source() -> str:
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpi"
    if "SLURM_PROCID" in env:
        return "slurm"
    return "env" if "RANK" in env else "single process"


def node_index():
    # torchrun's GROUP_RANK, Slurm's SLURM_NODEID, DeepSpeed's launcher's CROSS_RANK
    for name in ("GROUP_RANK", "SLURM_NODEID", "CROSS_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def source_digest() -> str:
    """SHA-256 over the dist_sparse package's Python files: two installs of the same version string with other
    code differ here."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def versions() -> dict:
    import torch

    import dist_sparse

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    return {"dist_sparse": dist_sparse.__version__, "dist_sparse source": source_digest(), "torch": torch.__version__,
            "deepspeed": ds_version, "python": platform.python_version()}


def _ranks_text(ranks: list) -> str:
    ranks = sorted(ranks)
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def _groups(infos: list, value_of) -> str:
    """'VALUE on host A (ranks 0-3); VALUE2 on host B (rank 4)' for the distinct values."""
    by_value: dict = {}
    for info in infos:
        v = json.dumps(value_of(info), sort_keys=True, default=str)
        by_value.setdefault(v, {}).setdefault(info["host"], []).append(info["rank"])
    parts = []
    for v, hosts in by_value.items():
        where = ", ".join(f"{h} ({_ranks_text(r)})" for h, r in hosts.items())
        parts.append(f"{v} on {where}")
    return "; ".join(parts)


def compare(infos: list, configs: list | None = None) -> str | None:
    """The disagreement between ranks as an error message, or None. ``infos``: every rank's ``describe_rank``;
    ``configs``: every rank's flattened config (needed only when the config hashes differ)."""
    for key in infos[0]["versions"]:
        if len({json.dumps(i["versions"].get(key)) for i in infos}) > 1:
            return (f"the ranks run different installs: {key} differs: "
                    f"{_groups(infos, lambda i, k=key: i['versions'].get(k))}")
    if len({i["config_hash"] for i in infos}) > 1:
        if configs is None:
            return "the ranks resolved different configs"
        keys = list(configs[0])
        for c in configs[1:]:
            keys += [k for k in c if k not in keys]
        missing = "<unset>"
        for key in keys:
            if len({json.dumps(c.get(key, missing), sort_keys=True, default=str) for c in configs}) > 1:
                rows = [dict(i, value=c.get(key, missing)) for i, c in zip(infos, configs)]
                return (f"the ranks resolved different configs: first differing key {key}: "
                        f"{_groups(rows, lambda r: r['value'])} (start every node with the same config file and "
                        "--set overrides)")
    return None


def describe_rank(cfg_flat: dict) -> dict:
    return {"rank": D.rank(), "host": host_name(), "node": node_index(),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1"))),
            "config_hash": _digest(cfg_flat), "versions": versions(), "nonce": uuid.uuid4().hex}


def node_names(infos: list) -> list:
    """Per rank, the name of its node: its host, or ``host#N`` where several nodes share one host name (nodes
    simulated on one machine, or containers reporting one name)."""
    nodes_of_host: dict = {}
    for i in infos:
        nodes_of_host.setdefault(i["host"], set()).add(i["node"])
    return [i["host"] if len(nodes_of_host[i["host"]]) == 1 else f"{i['host']}#{i['node']}" for i in infos]


def node_layout(group=None) -> list:
    """Per rank, the name of its node (:func:`node_names`), from one all-gather (a collective). Gradient
    compression's inter-node scope groups ranks by it, summary.json's ``ranks_per_node`` counts it."""
    mine = {"host": host_name(), "node": node_index()}
    return node_names(D.all_gather_object(mine, group))


def ranks_per_node(infos: list) -> dict:
    out: dict = {}
    for name in node_names(infos):
        out[name] = out.get(name, 0) + 1
    return out


def probe_shared_dir(path, infos: list, wait_s: float = 10.0) -> None:
    """Every rank writes a probe file under ``path`` and checks that it sees every other rank's; a directory some
    rank cannot see is refused on every rank (a node-local directory would leave each node with part of every
    checkpoint). Network filesystems may show a peer's new file after a delay: each rank looks for ``wait_s``."""
    rank, world = D.rank(), D.world_size()
    names = node_names(infos)
    probe = Path(path) / PROBE_DIR / infos[0]["nonce"]
    problem = None
    try:
        probe.mkdir(parents=True, exist_ok=True)
        mine = probe / f"rank_{rank:05d}"
        with open(mine, "w") as f:
            f.write(names[rank] + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        problem = f"cannot write a probe file under {path}: {exc.strerror or exc}"
    D.barrier()
    unseen = []
    if problem is None:
        deadline = time.monotonic() + wait_s
        while True:
            unseen = [r for r in range(world) if not (probe / f"rank_{r:05d}").is_file()]
            if not unseen or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    verdicts = D.all_gather_object({"problem": problem, "unseen": unseen})
    D.barrier()
    try:
        (probe / f"rank_{rank:05d}").unlink(missing_ok=True)
    except OSError:
        pass
    D.barrier()
    if rank == 0:
        shutil.rmtree(probe, ignore_errors=True)
        try:
            (Path(path) / PROBE_DIR).rmdir()
        except OSError:  # another job's probe is there, or it is not ours to remove
            pass
    bad = [(r, v) for r, v in enumerate(verdicts) if v["problem"] or v["unseen"]]
    if not bad:
        return
    r, v = bad[0]
    if v["problem"]:
        raise PreflightError(f"rank {r} on {names[r]}: {v['problem']}")
    missing_nodes = sorted({names[u] for u in v["unseen"]})
    raise PreflightError(
        f"checkpoint directory {path} is not shared by every node: rank {r} on {names[r]} does not see the probe "
        f"files written there by {', '.join(missing_nodes)} ({len(bad)} of {world} ranks miss some). It looks "
        "node-local; set train.output_dir to a directory every node can read and write (a shared filesystem)")


def run(cfg, ckpt_root) -> dict:
    """All start-of-run checks (a collective); returns ``nodes`` and ``ranks_per_node`` for summary.json."""
    flat = flatten(cfg.to_dict())
    me = describe_rank(flat)
    world = D.world_size()
    # once per rank, whatever the log level of non-zero ranks: which rank runs where is the first thing to check
    # in a multi-node job
    print(f"[dist_sparse] rank {me['rank']} of {world}: host {me['host']}, local rank {me['local_rank']} of "
          f"{me['local_world_size']}, node {me['node'] if me['node'] is not None else '?'} "
          f"(from {discovery_source()})", file=sys.stderr, flush=True)
    infos = D.all_gather_object(me)
    # every rank sees the same hashes, so every rank takes part in the second gather or none does
    configs = D.all_gather_object(flat) if len({i["config_hash"] for i in infos}) > 1 else None
    problem = compare(infos, configs)
    if problem is not None:
        raise PreflightError(problem)
    per_node = ranks_per_node(infos)
    if len(per_node) > 1:
        probe_shared_dir(ckpt_root, infos)
    return {"nodes": len(per_node), "ranks_per_node": per_node}
