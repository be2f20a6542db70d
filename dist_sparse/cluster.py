"""Where the ranks of a job are: hostfiles, Slurm's variables, the environment a launcher leaves, and what travels
to other hosts. Pure functions of files and environment dicts (no processes, no torch), so every parsing rule is
testable in-process; ``dist_sparse.cli.launch`` builds commands from them and ``dist_sparse.preflight`` reports them.

Discovery order inside a rank (``discover``): Slurm's variables when ``SLURM_PROCID`` is set, then the torch
variables a launcher sets (``RANK``, ``WORLD_SIZE``, ...), then MPI (mpi4py, ``distributed.discover_mpi_env``). One
exception to Slurm first: a process that torchrun or Open MPI's mpirun started inside a Slurm allocation inherits
the ``SLURM_*`` variables of the *task that started the launcher* (its ``SLURM_PROCID`` is that task's, not this
rank's), so there the launcher's own variables are the truth.
"""

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from dist_sparse.errors import DistSparseError


class ClusterError(DistSparseError, ValueError):
    """A hostfile, a Slurm variable or a launch flag is malformed or inconsistent. ``what`` names the file,
    variable or flag at fault."""

    def __init__(self, what: str, message: str):
        self.what = what
        super().__init__(f"{what}: {message}")


DEFAULT_MASTER_PORT = 29500

# --------------------------------------------------------------------------------------------------------------
# hostfiles (DeepSpeed's format: "host slots=N", '#' comments, blank lines)

_HOST_LINE = re.compile(r"^(\S+)\s+slots\s*=\s*(\d+)\s*$")


def parse_hostfile_text(text: str, name: str = "hostfile") -> dict:
    """host -> slots, in file order. A bad line, a repeated host, zero slots or an empty file is a ClusterError
    naming the file and line."""
    hosts: dict = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if not m:
            raise ClusterError(f"{name}:{lineno}", f"expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots = m.group(1), int(m.group(2))
        if host in hosts:
            raise ClusterError(f"{name}:{lineno}", f"host {host!r} is listed twice")
        if slots < 1:
            raise ClusterError(f"{name}:{lineno}", f"host {host!r} has slots={slots}; need >= 1")
        hosts[host] = slots
    if not hosts:
        raise ClusterError(name, "no hosts (expected lines like 'worker-1 slots=8')")
    return hosts


def read_hostfile(path) -> dict:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ClusterError(str(p), f"cannot read hostfile: {exc.strerror or exc}") from exc
    return parse_hostfile_text(text, str(p))


def _node_specs(spec: str, flag: str) -> dict:
    """DeepSpeed's NODE_SPEC[@NODE_SPEC ...] with NODE_SPEC = HOST[:SLOT[,SLOT ...]] -> host -> slot list ([] =
    every slot)."""
    out: dict = {}
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise ClusterError(flag, f"empty node in {spec!r} (format HOST[:SLOT,...]@HOST...)")
        host, _, slots = part.partition(":")
        try:
            wanted = [int(s) for s in slots.split(",")] if slots else []
        except ValueError:
            raise ClusterError(flag, f"slots of {host!r} must be integers, got {slots!r}") from None
        out.setdefault(host, [])
        out[host] = sorted(set(out[host] + wanted))
    return out


def filter_hosts(hosts: dict, include: str | None = None, exclude: str | None = None) -> dict:
    """host -> list of slot indices after ``--include`` / ``--exclude`` (DeepSpeed's semantics; mutually
    exclusive). Unknown hosts or slots are ClusterErrors naming the flag."""
    if include and exclude:
        raise ClusterError("--include/--exclude", "are mutually exclusive")
    pool = {h: list(range(n)) for h, n in hosts.items()}
    if not include and not exclude:
        return pool
    flag = "--include" if include else "--exclude"
    specs = _node_specs(include or exclude, flag)
    for host, slots in specs.items():
        if host not in pool:
            raise ClusterError(flag, f"host {host!r} is not in the hostfile (hosts: {', '.join(pool)})")
        bad = [s for s in slots if s not in pool[host]]
        if bad:
            raise ClusterError(flag, f"host {host!r} has no slot {bad[0]} (slots 0..{len(pool[host]) - 1})")
    if include:
        chosen = {h: (specs[h] or pool[h]) for h in pool if h in specs}  # hostfile order, not flag order
    else:
        chosen = {h: ([] if (h in specs and not specs[h]) else [s for s in pool[h] if s not in specs.get(h, [])])
                  for h in pool}
    chosen = {h: s for h, s in chosen.items() if s}
    if not chosen:
        raise ClusterError(flag, "leaves no host to run on")
    return chosen


# --------------------------------------------------------------------------------------------------------------
# Slurm's compressed host lists and task counts (parsed here: `scontrol show hostnames` may not exist on a node)


def _split_top(text: str, what: str) -> list:
    """Split at commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ClusterError(what, f"nested '[' in {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ClusterError(what, f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ClusterError(what, f"unbalanced '[' in {text!r}")
    parts.append("".join(cur))
    return parts


def _expand_range(body: str, text: str, what: str) -> list:
    out = []
    for item in body.split(","):
        item = item.strip()
        lo, dash, hi = item.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ClusterError(what, f"bad range {item!r} in {text!r}")
        if not dash:
            out.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise ClusterError(what, f"range {item!r} in {text!r} runs backwards")
        width = len(lo)  # Slurm keeps the zero padding of the lower bound: gpu[08-10] -> gpu08 gpu09 gpu10
        out += [str(i).zfill(width) for i in range(a, b + 1)]
    return out


def parse_nodelist(text: str, what: str = "SLURM_JOB_NODELIST") -> list:
    """``gpu[01-04,07],cpu3`` -> ['gpu01', 'gpu02', 'gpu03', 'gpu04', 'gpu07', 'cpu3'], in order; several bracket
    groups in one name expand as a product (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2), as Slurm does."""
    text = (text or "").strip()
    if not text:
        raise ClusterError(what, "is empty")
    hosts = []
    for part in _split_top(text, what):
        part = part.strip()
        if not part:
            raise ClusterError(what, f"empty host name in {text!r}")
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            if body is None or body == "":
                if "[]" in part:
                    raise ClusterError(what, f"empty brackets in {text!r}")
                names = [n + literal for n in names]
                continue
            names = [n + literal + x for n in names for x in _expand_range(body, text, what)]
        hosts += names
    return hosts


def parse_tasks_per_node(text: str, what: str = "SLURM_TASKS_PER_NODE") -> list:
    """``2(x3),1`` -> [2, 2, 2, 1]."""
    out = []
    text = (text or "").strip()
    if not text:
        raise ClusterError(what, "is empty")
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ClusterError(what, f"bad entry {item!r} in {text!r} (expected N or N(xM))")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


# --------------------------------------------------------------------------------------------------------------
# discovery inside a rank


@dataclass
class Placement:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    source: str  # slurm | torch | mpi | single

    def torch_env(self) -> dict:
        """The variables torch's env:// rendezvous (and our trainer) read."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "GROUP_RANK": str(self.node_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def _int_var(env: dict, names, required=True):
    for name in names:
        if name in env and env[name] != "":
            try:
                return int(env[name])
            except ValueError:
                raise ClusterError(name, f"must be an integer, got {env[name]!r}") from None
    if required:
        raise ClusterError(names[0], "is not set (inside a Slurm allocation, start ranks with srun)")
    return None


def slurm_port(env: dict) -> int:
    """MASTER_PORT when set, else one every task derives alike from the job id (no communication needed; two jobs
    sharing a first node rarely collide)."""
    if env.get("MASTER_PORT"):
        return _int_var(env, ["MASTER_PORT"])
    job = _int_var(env, ["SLURM_JOB_ID", "SLURM_JOBID"], required=False) or 0
    return 20000 + job % 20000


def slurm_placement(env: dict) -> Placement:
    """A task that srun started: rank, world and node from ``SLURM_*`` (the step's values first: a step may use
    part of the allocation). The first host of the node list is the master."""
    rank = _int_var(env, ["SLURM_PROCID"])
    world = _int_var(env, ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"])
    local = _int_var(env, ["SLURM_LOCALID"])
    node = _int_var(env, ["SLURM_NODEID"])
    list_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)),
                    "SLURM_JOB_NODELIST")
    hosts = parse_nodelist(env.get(list_var, ""), list_var)
    tasks_var = next((v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(v)), None)
    if tasks_var is not None:
        tasks = parse_tasks_per_node(env[tasks_var], tasks_var)
        if len(tasks) != len(hosts):
            raise ClusterError(tasks_var, f"{env[tasks_var]!r} gives {len(tasks)} nodes, {list_var} lists "
                                          f"{len(hosts)}")
        if sum(tasks) != world:
            raise ClusterError(tasks_var, f"{env[tasks_var]!r} sums to {sum(tasks)} tasks, SLURM_NTASKS is {world}")
    else:  # no per-node counts: an even split
        if world % len(hosts):
            raise ClusterError("SLURM_TASKS_PER_NODE", f"not set, and {world} tasks do not split evenly over "
                                                       f"{len(hosts)} nodes")
        tasks = [world // len(hosts)] * len(hosts)
    if not 0 <= rank < world:
        raise ClusterError("SLURM_PROCID", f"{rank} is outside 0..{world - 1}")
    if not 0 <= node < len(hosts):
        raise ClusterError("SLURM_NODEID", f"{node} is outside 0..{len(hosts) - 1} ({list_var}={env[list_var]})")
    if not 0 <= local < tasks[node]:
        raise ClusterError("SLURM_LOCALID", f"{local} is outside 0..{tasks[node] - 1} on node {node}")
    return Placement(rank, world, local, tasks[node], node, len(hosts), env.get("MASTER_ADDR") or hosts[0],
                     slurm_port(env), "slurm")


def _started_by_other_launcher(env: dict) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or "OMPI_COMM_WORLD_RANK" in env


def torch_placement(env: dict) -> Placement:
    rank, world = _int_var(env, ["RANK"]), _int_var(env, ["WORLD_SIZE"])
    local = _int_var(env, ["LOCAL_RANK"], required=False) or 0
    local_world = _int_var(env, ["LOCAL_WORLD_SIZE"], required=False) or 1
    node = _int_var(env, ["GROUP_RANK", "NODE_RANK"], required=False)
    if node is None:
        node = rank // max(1, local_world)
    nnodes = _int_var(env, ["GROUP_WORLD_SIZE", "NNODES"], required=False) or max(1, world // max(1, local_world))
    return Placement(rank, world, local, local_world, node, nnodes, env.get("MASTER_ADDR", "127.0.0.1"),
                     int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), "torch")


MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def discover(env=None) -> Placement | None:
    """This rank's placement from the environment (see the module docstring for the order), or None for a single
    process without a launcher. MPI returns None here: its rank comes from mpi4py, inside init_distributed."""
    env = os.environ if env is None else env
    if "SLURM_PROCID" in env and not _started_by_other_launcher(env):
        return slurm_placement(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return torch_placement(env)
    return None


def apply_discovery(env=None) -> Placement | None:
    """Export the torch variables of a Slurm task (torch's env:// rendezvous and the trainer read them); other
    sources need nothing exported."""
    env = os.environ if env is None else env
    placement = discover(env)
    if placement is not None and placement.source == "slurm":
        env.update(placement.torch_env())
    return placement


def under_launcher(env=None) -> bool:
    """True when this process is one rank of a started job (so it trains instead of launching)."""
    env = os.environ if env is None else env
    return ("RANK" in env and "WORLD_SIZE" in env) or any(m in env for m in MPI_MARKERS)


# --------------------------------------------------------------------------------------------------------------
# environment that travels to other hosts (DeepSpeed's .deepspeed_env convention)

# DeepSpeed exports these prefixes to other nodes (MLFLOW, PYTHON, MV2, UCX, and NCCL for CUDA); we add the
# variables dist_sparse, gloo, OpenMP and Hugging Face read
EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL", "GLOO_", "DIST_SPARSE_", "HF_", "TRANSFORMERS_",
                   "TOKENIZERS_")
EXPORT_NAMES = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "CUDA_HOME", "LD_LIBRARY_PATH")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_files(env=None, cwd=None) -> list:
    """The ``.deepspeed_env`` files DeepSpeed's runner reads, in its order: the home directory's, then the working
    directory's (a later one wins); ``DS_ENV_FILE`` renames the file, and an absolute one is read once."""
    env = os.environ if env is None else env
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    home = env.get("HOME", os.path.expanduser("~"))
    paths = []
    for base in (home, cwd or os.getcwd()):
        p = Path(os.path.join(base, name))
        if p.is_file() and p.resolve() not in [q.resolve() for q in paths]:
            paths.append(p)
    return paths


def parse_env_file(path) -> dict:
    """``KEY=VALUE`` lines (blank lines and '#' comments allowed; DeepSpeed's own reader allows neither, so files
    written for both should avoid them). A line without '=' or a bad name is a ClusterError naming file and line."""
    out = {}
    p = Path(path)
    for lineno, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not _ENV_NAME.match(key):
            raise ClusterError(f"{p}:{lineno}", f"expected KEY=VALUE, got {raw.strip()!r}")
        out[key] = value.strip()
    return out


def exported_env(env=None, cwd=None, extra=None) -> dict:
    """What every other host gets: the exported prefixes/names from this environment, then ``.deepspeed_env``
    files (which win), then ``extra`` (the launcher's own variables)."""
    env = os.environ if env is None else env
    out = {k: v for k, v in env.items()
           if k.startswith(EXPORT_PREFIXES) or k in EXPORT_NAMES}
    for f in env_files(env, cwd):
        out.update(parse_env_file(f))
    out.update(extra or {})
    return dict(sorted(out.items()))


def env_prefix(env: dict) -> str:
    """``env K=V ...`` for a remote shell command (values shell-quoted)."""
    if not env:
        return ""
    return "env " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items()) + " "
