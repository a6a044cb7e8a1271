"""Real servers on 127.0.0.1 for the object-store tests: an S3-API server (moto's server mode), nginx serving a
folder (HTTP with Range support), and a TCP proxy in front of either that injects faults."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen | None = None, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds}s")


@contextlib.contextmanager
def _serving(proc: subprocess.Popen, port: int) -> Iterator[None]:
    """A server process, once it listens on `port`; stopped at the end."""
    try:
        _wait_for(port, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def s3_server(no_auth_actions: int | None = None) -> Iterator[str]:
    """moto's S3 server in a subprocess; yields its endpoint URL. With `no_auth_actions`, moto checks credentials
    after that many requests (so a test can create a bucket, then be refused with wrong keys)."""
    port = free_port()
    env = {**os.environ, **CREDENTIALS}
    if no_auth_actions is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(no_auth_actions)
    cmd = [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)]
    with _serving(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port):
        yield f"http://127.0.0.1:{port}"


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def upload_folder(endpoint: str, folder: Path, bucket: str, prefix: str) -> None:
    client = s3_client(endpoint)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    for f in sorted(folder.iterdir()):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


@contextlib.contextmanager
def nginx(root: Path) -> Iterator[str]:
    """nginx serving `root` read-only (Range requests included); yields its base URL."""
    port, work = free_port(), Path(root).parent / f".nginx-{free_port()}"
    work.mkdir()
    user = "user root;" if os.geteuid() == 0 else ""  # as root, nginx's workers would run as nobody: /tmp is 0700
    conf = work / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""
        daemon off; {user} worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log off; client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
            uwsgi_temp_path {work}; scgi_temp_path {work};
            server {{ listen 127.0.0.1:{port}; root {root}; }}
        }}""")
    )
    with _serving(subprocess.Popen([NGINX, "-c", str(conf), "-p", str(work)], stderr=subprocess.DEVNULL), port):
        yield f"http://127.0.0.1:{port}"


class FaultProxy:
    """A TCP proxy to 127.0.0.1:`target`: each connection is forwarded as it is, unless a fault is queued.

    fail(n, "503"): the next n connections are answered 503 without reaching the server.
    fail(n, "drop"): the next n connections get the start of the server's answer, then are closed mid-object.
    fail(n, "stall"): the next n connections are accepted and never answered.
    """

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.faults: list[str] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, n: int, mode: str) -> None:
        with self.lock:
            self.faults += [mode] * n

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                fault = self.faults.pop(0) if self.faults else None
            threading.Thread(target=self._handle, args=(client, fault), daemon=True).start()

    def _handle(self, client: socket.socket, fault: str | None) -> None:
        with client:
            if fault == "503":
                client.recv(65536)
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if fault == "stall":
                client.recv(65536)
                time.sleep(30)
                return
            with socket.create_connection(("127.0.0.1", self.target)) as server:
                pump = threading.Thread(target=self._pump, args=(client, server), daemon=True)
                pump.start()
                sent = 0
                while data := server.recv(65536):
                    if fault == "drop" and sent + len(data) > 1024:
                        client.sendall(data[: 1024 - sent])
                        client.shutdown(socket.SHUT_RDWR)
                        return
                    client.sendall(data)
                    sent += len(data)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
