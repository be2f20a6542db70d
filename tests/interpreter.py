"""Run a test file's Triton tests in a fresh process with ``TRITON_INTERPRET=1``.

``triton.jit`` decides at decoration time whether it builds a GPU kernel or an interpreted one, and that includes
Triton's own ``@jit`` helpers decorated when ``triton`` is first imported; in a shared pytest process something may
have imported triton already, so a subprocess started with the variable set is the only reliable way in.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreter_subprocess(test_file: str, keyword: str, child_env: str, n_tests: int) -> None:
    """Run the tests of ``test_file`` matching ``keyword`` with ``TRITON_INTERPRET=1`` and ``child_env=1`` (the
    marker that un-skips them); all ``n_tests`` of them must pass."""
    env = {**os.environ, "TRITON_INTERPRET": "1", child_env: "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-k", keyword, "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert f"{n_tests} passed" in proc.stdout, report
