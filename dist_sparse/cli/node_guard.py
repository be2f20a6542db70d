"""``python -m dist_sparse.cli.node_guard -- COMMAND ...``: runs one node's launcher at the far end of an ssh session
and ties it to that session.

ssh does not signal a remote command that has no terminal when the session ends, so a launcher killed on the
launching host would leave torchrun and its ranks running on every other host. The guard reads its stdin (the ssh
session): a line ``signal NAME`` forwards SIGTERM/SIGUSR1 to the ranks below it (a stop with a checkpoint, see
dist_sparse/stopping.py); the end of stdin (the session is gone) sends SIGTERM to the whole tree, then SIGKILL after
a grace period. It exits with the command's exit code.
"""

import os
import signal
import subprocess
import sys
import threading

GRACE_S = 120.0


def _watch(proc: subprocess.Popen) -> None:
    from dist_sparse.cli.launch import forward_signal

    for raw in sys.stdin.buffer:
        words = raw.decode(errors="replace").split()
        if len(words) == 2 and words[0] == "signal" and words[1] in ("SIGTERM", "SIGUSR1"):
            forward_signal(proc.pid, getattr(signal, words[1]))
    if proc.poll() is not None:
        return
    # the session ended while the command runs: take the whole tree down, gently first
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m dist_sparse.cli.node_guard -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    # its own process group, so the end of the session can end every process below it at once
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    threading.Thread(target=_watch, args=(proc,), daemon=True).start()

    def forward(signum, frame):  # a signal sent to the guard itself (e.g. by a remote scheduler)
        from dist_sparse.cli.launch import forward_signal

        forward_signal(proc.pid, signum)

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, forward)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
