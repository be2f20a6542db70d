"""Multi-node launching and stopping, the pure parts, in-process (no training processes): hostfiles and
--include/--exclude, Slurm's nodelists and task counts, discovery order, .deepspeed_env propagation, the command of
every launcher (what --dry-run prints), time limits and stop signals, the preflight verdicts, the shared-directory
probe on 2 gloo ranks. The launches themselves are in tests/test_multinode_launch.py."""

import os
import shlex
import signal
from types import SimpleNamespace

import pytest

from dist_sparse import cluster, preflight, stopping
from dist_sparse.cli import launch
from dist_sparse.cli import train as train_cli
from dist_sparse.cluster import ClusterError
from dist_sparse.errors import ConfigError
from tests.distributed_utils import ROOT, run_spawned

# ----------------------------------------------------------------------------------------------------------------
# Slurm


@pytest.mark.parametrize("text,hosts", [
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("node[08-10]", ["node08", "node09", "node10"]),  # padding of the lower bound
    ("single", ["single"]),
    ("a-1,b-2", ["a-1", "b-2"]),  # dashes outside brackets are part of the name
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # several groups: a product
    ("x[3],y[000-001]", ["x3", "y000", "y001"]),
    ("pre[1-2]-post", ["pre1-post", "pre2-post"]),
])
def test_nodelist_parsing(text, hosts):
    assert cluster.parse_nodelist(text) == hosts


@pytest.mark.parametrize("text,msg", [
    ("gpu[01-", "unbalanced '['"), ("gpu01]", "unbalanced ']'"), ("gpu[]", "empty brackets"),
    ("gpu[3-1]", "runs backwards"), ("gpu[a-b]", "bad range"), ("", "is empty"), ("a,,b", "empty host name"),
    ("g[[1]]", "nested"), ("gpu[1-]", "bad range"),
])
def test_nodelist_errors_name_the_variable(text, msg):
    with pytest.raises(ClusterError) as err:
        cluster.parse_nodelist(text)
    assert err.value.what == "SLURM_JOB_NODELIST" and msg in str(err.value)


def test_tasks_per_node_forms():
    assert cluster.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert cluster.parse_tasks_per_node("4") == [4]
    assert cluster.parse_tasks_per_node("1,3(x2)") == [1, 3, 3]
    for bad in ("2(x)", "x", "2(3)", ""):
        with pytest.raises(ClusterError, match="SLURM_TASKS_PER_NODE"):
            cluster.parse_tasks_per_node(bad)


def _slurm(**kw):
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
           "SLURM_JOB_NODELIST": "gpu[01-03],cpu3", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_JOB_ID": "123456"}
    env.update(kw)
    return {k: v for k, v in env.items() if v is not None}


def test_slurm_discovery_from_variables():
    p = cluster.discover(_slurm())
    assert (p.source, p.rank, p.world_size, p.local_rank, p.local_world_size) == ("slurm", 5, 7, 0, 2)
    assert (p.node_rank, p.nnodes, p.master_addr) == (2, 4, "gpu01")
    assert p.master_port == 20000 + 123456 % 20000  # the same on every task, with no communication
    assert cluster.discover(_slurm(MASTER_PORT="3333", MASTER_ADDR="10.0.0.9")).master_port == 3333
    last = cluster.discover(_slurm(SLURM_PROCID="6", SLURM_NODEID="3"))
    assert last.local_world_size == 1 and last.node_rank == 3
    # a step that uses part of the allocation: the step's variables win
    step = cluster.discover(_slurm(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="cpu3,gpu01",
                                   SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_PROCID="1", SLURM_NODEID="1"))
    assert (step.world_size, step.nnodes, step.master_addr, step.local_world_size) == (2, 2, "cpu3", 1)
    env = _slurm()
    assert cluster.apply_discovery(env).source == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["GROUP_RANK"]) == ("5", "7", "0", "2")
    assert env["MASTER_ADDR"] == "gpu01" and env["LOCAL_WORLD_SIZE"] == "2"


@pytest.mark.parametrize("change,what", [
    ({"SLURM_TASKS_PER_NODE": "2(x3)"}, "SLURM_TASKS_PER_NODE"),  # 3 counts for 4 nodes
    ({"SLURM_TASKS_PER_NODE": "2(x4)"}, "SLURM_TASKS_PER_NODE"),  # sums to 8, not 7
    ({"SLURM_LOCALID": "2"}, "SLURM_LOCALID"),
    ({"SLURM_NODEID": "4"}, "SLURM_NODEID"),
    ({"SLURM_PROCID": "7"}, "SLURM_PROCID"),
    ({"SLURM_NTASKS": None}, "SLURM_STEP_NUM_TASKS"),
    ({"SLURM_LOCALID": "one"}, "SLURM_LOCALID"),
    ({"SLURM_JOB_NODELIST": "gpu[01-03"}, "SLURM_JOB_NODELIST"),
])
def test_slurm_inconsistent_variables_are_named(change, what):
    with pytest.raises(ClusterError) as err:
        cluster.discover(_slurm(**change))
    assert err.value.what == what


def test_discovery_order():
    both = {**_slurm(), "RANK": "1", "WORLD_SIZE": "2"}
    assert cluster.discover(both).source == "slurm"  # Slurm first
    # ... except for a worker that torchrun (or mpirun) started inside the allocation: its SLURM_PROCID is the
    # launching task's
    assert cluster.discover({**both, "TORCHELASTIC_RUN_ID": "x"}).source == "torch"
    assert cluster.discover({**_slurm(), "OMPI_COMM_WORLD_RANK": "0"}) is None  # MPI, inside init_distributed
    t = cluster.discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                          "GROUP_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (t.source, t.rank, t.node_rank, t.nnodes, t.master_port) == ("torch", 3, 1, 2, 1234)
    assert cluster.discover({}) is None
    assert cluster.under_launcher({"OMPI_COMM_WORLD_SIZE": "2"}) and not cluster.under_launcher(_slurm())


# ----------------------------------------------------------------------------------------------------------------
# hostfiles, include/exclude


def test_hostfile_parsing_and_errors(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster\nworker-0 slots=4\n\nworker-1  slots = 2   # spare\n")
    assert cluster.read_hostfile(f) == {"worker-0": 4, "worker-1": 2}
    for text, msg in [("w slots=x\n", "expected 'HOST slots=N'"), ("w 4\n", "expected"),
                      ("a slots=1\na slots=2\n", "listed twice"), ("a slots=0\n", "slots=0"), ("# none\n", "no hosts")]:
        f.write_text(text)
        with pytest.raises(ClusterError, match=msg) as err:
            cluster.read_hostfile(f)
        assert str(f) in err.value.what
    with pytest.raises(ClusterError, match="cannot read hostfile"):
        cluster.read_hostfile(tmp_path / "missing")


def test_include_exclude_follow_deepspeed():
    hosts = {"a": 4, "b": 2, "c": 1}
    assert cluster.filter_hosts(hosts) == {"a": [0, 1, 2, 3], "b": [0, 1], "c": [0]}
    assert cluster.filter_hosts(hosts, include="c@a:1,3") == {"a": [1, 3], "c": [0]}  # hostfile order
    assert cluster.filter_hosts(hosts, exclude="b@a:0") == {"a": [1, 2, 3], "c": [0]}
    for kw, msg in [({"include": "z"}, "not in the hostfile"), ({"include": "a:9"}, "no slot 9"),
                    ({"include": "a", "exclude": "b"}, "mutually exclusive"), ({"include": "a:x"}, "integers"),
                    ({"exclude": "a@b@c"}, "leaves no host"), ({"include": "a@"}, "empty node")]:
        with pytest.raises(ClusterError, match=msg):
            cluster.filter_hosts(hosts, **kw)


# ----------------------------------------------------------------------------------------------------------------
# environment propagation


def test_deepspeed_env_files_and_exports(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (cwd / ".deepspeed_env").write_text("# comment\n\nB=cwd\nC=has spaces\n")
    env = {"HOME": str(home), "NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": "/x",
           "SECRET_TOKEN": "no", "DS_ACCELERATOR": "cpu"}
    out = cluster.exported_env(env, cwd=str(cwd), extra={"DIST_SPARSE_LAUNCH_ID": "id"})
    assert out == {"A": "home", "B": "cwd", "C": "has spaces", "DIST_SPARSE_LAUNCH_ID": "id", "DS_ACCELERATOR": "cpu",
                   "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0", "PYTHONPATH": "/x"}
    assert "SECRET_TOKEN" not in out  # only what DeepSpeed's convention exports
    named = tmp_path / "job.env"
    named.write_text("D=1\n")
    assert cluster.exported_env({**env, "DS_ENV_FILE": str(named)}, cwd=str(cwd))["D"] == "1"
    assert shlex.split(cluster.env_prefix({"C": "has spaces"})) == ["env", "C=has spaces"]
    (cwd / ".deepspeed_env").write_text("no equals sign\n")
    with pytest.raises(ClusterError, match=r"\.deepspeed_env:1"):
        cluster.exported_env(env, cwd=str(cwd))


# ----------------------------------------------------------------------------------------------------------------
# commands of every launcher (what --dry-run prints)


def _args(**kw):
    base = dict(config=str(ROOT / "configs" / "demo.yaml"), overrides=["train.steps=5"], resume=None,
                max_restarts=0, launcher="torchrun", nproc=None, hostfile=None, nproc_per_node=None,
                master_addr=None, master_port=None, include=None, exclude=None, nnodes=None, node_rank=None,
                dry_run=False)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def hostfile(tmp_path, monkeypatch):
    f = tmp_path / "hosts"
    f.write_text("nodeA slots=2\nnodeB slots=2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".deepspeed_env").write_text("MY_SETTING=42\nNCCL_DEBUG=INFO\n")
    monkeypatch.delenv("DIST_SPARSE_LAUNCH_ID", raising=False)
    return f


def test_torchrun_over_ssh_one_agent_per_host(hostfile):
    plan = launch.build(_args(hostfile=str(hostfile), master_port=29999))
    assert [n.host for n in plan.nodes] == ["nodeA", "nodeB"] and [n.ranks for n in plan.nodes] == [2, 2]
    for node in plan.nodes:
        ssh, opts, host, line = node.argv[0], node.argv[1:3], node.argv[3], node.argv[4]
        assert ssh == "ssh" and opts == ["-o", "BatchMode=yes"] and host == node.host
        words = shlex.split(line)
        assert words[:3] == ["cd", os.getcwd(), "&&"] and words[3:5] == ["exec", "env"]
        assert f"DIST_SPARSE_HOST={node.host}" in words and "MY_SETTING=42" in words and "NCCL_DEBUG=INFO" in words
        assert f"DIST_SPARSE_LAUNCH_ID={plan.launch_id}" in words
        remote = node.remote
        assert remote[1:4] == ["-m", "dist_sparse.cli.node_guard", "--"]
        tr = remote[4:]
        assert tr[1:3] == ["-m", "torch.distributed.run"]
        assert _flag(tr, "--rdzv-backend") == "c10d" and _flag(tr, "--rdzv-endpoint") == "nodeA:29999"
        assert _flag(tr, "--nnodes") == "2" and _flag(tr, "--nproc-per-node") == "2"
        assert _flag(tr, "--rdzv-id") == plan.launch_id
        assert "SIGUSR1" in _flag(tr, "--signals-to-handle")
        assert tr[-3:] == ["dist_sparse.cli.train", str(ROOT / "configs" / "demo.yaml"), "--set=train.steps=5"]
        assert line.endswith(shlex.join(remote))
    # --nproc-per-node overrides the slots; --include of single slots pins devices like DeepSpeed's runner
    plan = launch.build(_args(hostfile=str(hostfile), nproc_per_node=1, master_addr="10.1.1.1"))
    assert [n.ranks for n in plan.nodes] == [1, 1] and "10.1.1.1:29500" in plan.nodes[1].argv[-1]
    plan = launch.build(_args(hostfile=str(hostfile), include="nodeB:1"))
    assert [n.host for n in plan.nodes] == ["nodeB"] and plan.nodes[0].env["CUDA_VISIBLE_DEVICES"] == "1"


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_mpirun_one_command_for_every_host(hostfile):
    plan = launch.build(_args(hostfile=str(hostfile), launcher="mpirun", exclude="nodeB"))
    (node,) = plan.nodes
    argv = node.argv
    assert argv[0].endswith("mpirun") and _flag(argv, "-H") == "nodeA:2" and _flag(argv, "-np") == "2"
    plan = launch.build(_args(hostfile=str(hostfile), launcher="mpirun", master_port=2345))
    argv = plan.nodes[0].argv
    assert _flag(argv, "-H") == "nodeA:2,nodeB:2" and _flag(argv, "-np") == "4" and _flag(argv, "--map-by") == "slot"
    exported = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert "MASTER_ADDR=nodeA" in exported and "MASTER_PORT=2345" in exported and "MY_SETTING=42" in exported
    assert argv[-4:-2] == ["-m", "dist_sparse.cli.train"]
    with pytest.raises(ClusterError, match="single slots"):
        launch.build(_args(hostfile=str(hostfile), launcher="mpirun", include="nodeA:1"))


def test_deepspeed_runner_with_a_merged_env_file(hostfile, tmp_path):
    plan = launch.build(_args(hostfile=str(hostfile), launcher="deepspeed", include="nodeB"), str(tmp_path / "out"))
    (node,) = plan.nodes
    argv = node.argv
    assert argv[1:3] == ["-m", "deepspeed.launcher.runner"] and _flag(argv, "--hostfile") == str(hostfile)
    assert _flag(argv, "--include") == "nodeB" and _flag(argv, "--master_addr") == "nodeB"
    assert "--module" in argv and argv[argv.index("--module") + 1] == "dist_sparse.cli.train"
    (path, text), = plan.files.items()
    assert node.env["DS_ENV_FILE"] == str(tmp_path / "out" / "launch" / f"deepspeed_env.{plan.launch_id}")
    lines = text.splitlines()  # DeepSpeed's reader takes KEY=VALUE lines only: no blanks, no comments
    assert "MY_SETTING=42" in lines and all("=" in line and not line.startswith("#") for line in lines)
    # the per-node command comes from DeepSpeed's own pdsh runner
    pdsh = [n for n in plan.notes if n.startswith("node 0 (nodeB) runs:")]
    assert pdsh and "deepspeed.launcher.launch" in pdsh[0] and "--node_rank=0" in pdsh[0]
    assert "MY_SETTING=42" in pdsh[0]
    with pytest.raises(ClusterError, match="exclude each other"):
        launch.build(_args(hostfile=str(hostfile), launcher="deepspeed", include="nodeB", nproc_per_node=1))


def test_one_command_per_node_and_flag_errors(hostfile):
    plan = launch.build(_args(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=4444, nproc_per_node=3,
                              max_restarts=2))
    argv = plan.nodes[0].argv
    assert plan.mode == "node" and plan.nodes[0].host is None
    assert (_flag(argv, "--nnodes"), _flag(argv, "--node-rank"), _flag(argv, "--master-addr"),
            _flag(argv, "--master-port"), _flag(argv, "--nproc-per-node"), _flag(argv, "--max-restarts")) == \
        ("2", "1", "10.0.0.1", "4444", "3", "2")
    assert "--rdzv-backend" not in argv  # torchrun's static rendezvous: ranks follow --node-rank
    assert plan.nodes[0].env["MY_SETTING"] == "42"  # .deepspeed_env, as every node of a hostfile launch gets it
    for kw, what in [(dict(nnodes=2, node_rank=2, master_addr="h"), "--node-rank"),
                     (dict(nnodes=2, node_rank=0), "--master-addr"),
                     (dict(nnodes=2, node_rank=0, master_addr="h", launcher="mpirun"), "--launcher"),
                     (dict(nnodes=2, node_rank=0, master_addr="h", hostfile=str(hostfile)), "--nnodes"),
                     (dict(nproc=2, include="a"), "--include"), (dict(nnodes=0, node_rank=0), "--nnodes")]:
        with pytest.raises(ClusterError) as err:
            launch.build(_args(**kw))
        assert err.value.what == what


def test_dry_run_prints_every_node_and_starts_nothing(hostfile, capsys):
    assert train_cli.main([str(ROOT / "configs" / "demo.yaml"), "--hostfile", str(hostfile), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "## node 0: host nodeA over ssh, 2 rank(s)" in out and "## node 1: host nodeB over ssh, 2 rank(s)" in out
    assert out.count("  MY_SETTING=42") == 2 and "  DIST_SPARSE_HOST=nodeB" in out
    assert out.count("command: ssh -o BatchMode=yes") == 2
    assert train_cli.main([str(ROOT / "configs" / "demo.yaml"), "--hostfile", str(hostfile), "--launcher",
                           "mpirun", "--dry-run"]) == 0
    assert "-H nodeA:2,nodeB:2" in capsys.readouterr().out
    assert train_cli.main([str(ROOT / "configs" / "demo.yaml"), "--hostfile", str(hostfile), "--include", "zz",
                           "--dry-run"]) == 2
    assert "--include: host 'zz' is not in the hostfile" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# stopping


@pytest.mark.parametrize("text,seconds", [("3h50m", 13800), ("90m", 5400), ("45s", 45), ("1d2h", 93600),
                                          ("2.5h", 9000), (120, 120), ("600", 600), ("1h 30m", 5400)])
def test_time_limit_parsing(text, seconds):
    assert stopping.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["3x", "h", "", "1h-2m", 0, -5, True, "m30"])
def test_time_limit_errors_name_the_key(bad):
    with pytest.raises(ConfigError) as err:
        stopping.parse_duration(bad)
    assert err.value.key == "train.time_limit"


def test_time_limit_rule_and_stop_signals(monkeypatch):
    # stop once the time left would not fit one more save plus two of the longest step
    assert stopping.time_to_stop(time_left=29.0, last_save_seconds=10.0, longest_step_seconds=10.0)
    assert not stopping.time_to_stop(time_left=31.0, last_save_seconds=10.0, longest_step_seconds=10.0)
    monkeypatch.setenv("DIST_SPARSE_START_TIME", "1000.0")
    s = stopping.Stopper("100s")
    try:
        s.saved(20.0)
        s.longest_step = 5.0
        assert s.start == 1000.0
        assert s.local_code(now=1000.0 + 69.0) == 0  # 31 s left > 20 + 2 * 5
        assert s.local_code(now=1000.0 + 71.0) == 2  # 29 s left
        assert s.agree(1.0) == "time_limit"  # a single process (no group): its own verdict; real time is far past
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.received == "SIGUSR1" and s.local_code(now=0.0) == 1 and s.agree(1.0) == "signal"
    finally:
        s.restore_handlers()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


_GRACE = """
import os, signal, sys, time
from dist_sparse.stopping import Stopper
s = Stopper(grace_s=float(sys.argv[1]))
if sys.argv[2] == "finishing":
    s.finishing()  # after the last step: a late signal arms no deadline
os.kill(os.getpid(), signal.SIGTERM)
if sys.argv[2] == "boundary":
    s.agree(0.01)  # a single process: reaching the boundary disarms the deadline
time.sleep(2)
print("survived", s.received)
"""


@pytest.mark.parametrize("where,grace,code", [("boundary", "30", 0), ("finishing", "0.5", 0),
                                              ("hung", "0.5", 128 + signal.SIGTERM)])
def test_a_signalled_rank_that_never_reaches_a_step_boundary_exits(where, grace, code):
    """torchrun also sends SIGTERM to tear a worker group down: a rank hung outside a collective must still end
    (after the grace period), while one that reaches the boundary stops normally."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _GRACE, grace, where], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.returncode == code, proc.stderr
    if code:
        assert "no step boundary within 0.5s of SIGTERM" in proc.stderr and "survived" not in proc.stdout
    else:
        assert "survived SIGTERM" in proc.stdout


def test_stop_record_and_exit_codes(tmp_path, monkeypatch):
    ranks = [{"rank": 0, "host": "a", "signal": None, "launch_id": "L1"},
             {"rank": 1, "host": "b", "signal": "SIGTERM", "launch_id": "L2"}]
    rec = stopping.write_record(tmp_path, "signal", 7, tmp_path / "ck", ranks)
    assert rec["signals"] == ["SIGTERM on rank 1 (b)"] and rec["exit_code"] == stopping.EXIT_STOPPED == 75
    assert stopping.recorded_stop(tmp_path, "L2")["step"] == 7  # each node's launcher finds its launch
    assert stopping.recorded_stop(tmp_path, "other") is None
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert stopping.rank_exit_code(True) == 75 and stopping.rank_exit_code(False) == 0
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun would restart a failed worker group
    assert stopping.rank_exit_code(True) == 0


# ----------------------------------------------------------------------------------------------------------------
# preflight


def _info(rank, host, node, cfg_hash="h", **versions):
    v = {"dist_sparse": "0.1.0", "torch": "2.13.0", "deepspeed": "0.19.8"}
    v.update(versions)
    return {"rank": rank, "host": host, "node": node, "config_hash": cfg_hash, "versions": v, "nonce": "n"}


def test_preflight_names_the_first_difference_and_the_hosts():
    same = [_info(0, "a", 0), _info(1, "a", 0), _info(2, "b", 1)]
    assert preflight.compare(same) is None
    msg = preflight.compare([_info(0, "a", 0), _info(1, "a", 0), _info(2, "b", 1, torch="2.12.0")])
    assert msg.startswith("the ranks run different installs: torch differs")
    assert '"2.13.0" on a (ranks 0,1)' in msg and '"2.12.0" on b (rank 2)' in msg
    infos = [_info(0, "a", 0, "h1"), _info(1, "b", 1, "h2")]
    configs = [{"model.n_layer": 2, "train.seed": 0, "train.steps": 5},
               {"model.n_layer": 2, "train.seed": 1, "train.steps": 6}]
    msg = preflight.compare(infos, configs)
    assert "first differing key train.seed: 0 on a (rank 0); 1 on b (rank 1)" in msg
    assert "first differing key extra" in preflight.compare(infos, [{"a": 1}, {"a": 1, "extra": 2}])
    assert preflight.flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}


def test_ranks_per_node_tells_nodes_sharing_a_host_name_apart():
    assert preflight.ranks_per_node([_info(0, "a", 0), _info(1, "a", 0), _info(2, "b", 1)]) == {"a": 2, "b": 1}
    assert preflight.ranks_per_node([_info(0, "vm", 0), _info(1, "vm", 1)]) == {"vm#0": 1, "vm#1": 1}


def _probe(rank, world, shared, local):
    import socket

    infos = [_info(r, socket.gethostname(), r) for r in range(world)]
    for name, path, wait_s in (("shared", shared, 5.0), ("local", local[rank], 0.5)):
        try:
            preflight.probe_shared_dir(path, infos, wait_s=wait_s)
            result = "ok"
        except preflight.PreflightError as exc:
            result = str(exc)
        with open(os.path.join(path, f"result_{name}_{rank}"), "w") as f:
            f.write(result)


def test_probe_refuses_a_node_local_checkpoint_dir(tmp_path):
    shared = tmp_path / "shared"
    local = [tmp_path / "node0", tmp_path / "node1"]  # what each node would see of a node-local path
    for d in (shared, *local):
        d.mkdir()
    run_spawned(_probe, 2, str(shared), [str(d) for d in local])
    assert (shared / "result_shared_0").read_text() == "ok" == (shared / "result_shared_1").read_text()
    assert not (shared / preflight.PROBE_DIR).exists()  # probes cleaned up
    for r, d in enumerate(local):
        msg = (d / f"result_local_{r}").read_text()
        assert "is not shared by every node" in msg and "node-local" in msg, msg  # on every rank
