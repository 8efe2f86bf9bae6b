"""Real services for tests, run natively on loopback ports and stopped by their pid."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """Distinct free ports below 55000, since SeaweedFS puts gRPC at port + 10000 unless told."""
    ports: set[int] = set()
    while len(ports) < count:
        port = free_port()
        if port < 55000:
            ports.add(port)
    return sorted(ports)


def wait_until(ready: Callable[[], bool], what: str, process: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.3)
    stop(process)
    raise TimeoutError(f"{what} not ready after {timeout_s}s; log {log}:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM the service's process group, SIGKILL it if it ignores that."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def executable(name: str) -> str:
    """A console script of this environment (beside the interpreter) or from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"`{name}` not found next to {sys.executable} or on PATH; install the test extras")
    return found


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }


def start_seaweedfs(workdir: Path) -> tuple[subprocess.Popen, S3Server]:
    """SeaweedFS master, volume, filer and S3 gateway in one `weed server`, with one identity."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = S3Server("", access_key="saviorrec-test", secret_key="saviorrec-test-secret")
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tests",
                        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3, *grpc = free_ports(8)
    log = workdir / "weed.log"
    command = [
        executable("weed"), "server", "-s3",
        "-ip=127.0.0.1", f"-dir={workdir}",
        f"-master.port={master}", f"-master.port.grpc={grpc[0]}",
        f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}",
        f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
        f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}",
        "-master.volumeSizeLimitMB=64", "-volume.max=32",
        f"-filer.localSocket={workdir}/filer.sock", f"-s3.localSocket={workdir}/s3.sock",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", server.access_key, server.secret_key)
    return process, server
