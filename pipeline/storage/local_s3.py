"""A real S3-compatible server on 127.0.0.1 (moto's `moto_server`), for tests, benchmarks and
trying `s3://` checkpoints without a cloud account; on another local address with `host` (the
gateway of the multi-node tests' private hosts).

    with local_s3_server() as endpoint:        # e.g. "http://127.0.0.1:40123"
        ... CheckpointStore("s3://bucket/run", endpoint_url=endpoint) ...
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from pipeline.errors import UserError

# moto accepts any credentials; they are given the standard way, as production would.
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@contextlib.contextmanager
def local_s3_server(host: str = "127.0.0.1") -> Iterator[str]:
    """Start moto_server on `host`, set dummy AWS credentials in os.environ, yield the endpoint
    URL."""
    if importlib.util.find_spec("moto") is None:
        raise UserError("moto is not installed: pip install 'anytime-pipeline[dev]'")
    port = free_port(host)
    # Lowest CPU priority: it stands in for a remote server, whose CPU is not the trainer's.
    # Run with this interpreter so that a virtual environment's moto is the one used.
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "moto.server", "-H",
                             host, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in DUMMY_CREDENTIALS}
    os.environ.update(DUMMY_CREDENTIALS)
    try:
        wait_for_port(port, host=host)
        yield f"http://{host}:{port}"
    finally:
        proc.kill()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
