"""The suite's own safeguard: a test that hangs fails with its stacks, and the run goes on."""

import os
import subprocess
import sys
from pathlib import Path

HANGS = """
import threading

def test_hangs():
    threading.Event().wait()

def test_after():
    pass
"""


def test_a_hung_test_fails_with_its_stack_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(HANGS)
    tests = Path(__file__).parent
    # As `make test` runs: two workers, whole files to each
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "conftest", "-n", "2", "--dist", "loadfile",
                           "--no-loadscope-reorder", "test_hang.py"], cwd=tmp_path,
                          env={**os.environ, "TEST_TIMEOUT": "2", "PYTHONPATH": str(tests)},
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 1 passed" in out, out  # once, and the test after it ran
    assert "test_hang.py::test_hangs: still running after 2 s; its threads:" in out, out
    assert 'test_hang.py", line 5 in test_hangs' in out, out  # where it hung
    assert "Failed: still running after 2 s (TEST_TIMEOUT)" in out, out
