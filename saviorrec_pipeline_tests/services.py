"""Real services for tests, run natively on loopback ports and stopped by their pid."""

import datetime as dt
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import s3fs


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


def stop(process: subprocess.Popen, timeout_s: float = 30, sig: int = signal.SIGTERM) -> None:
    """Signal a service's whole process group (SIGTERM unless told) and wait until every member has
    exited, not only the leader (a daemon's code servers and run workers); SIGKILL what is left."""
    pgid = process.pid
    deadline = time.monotonic() + timeout_s
    try:
        os.killpg(pgid, sig)
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # all gone
    process.wait()


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def isolated_environ() -> dict[str, str]:
    """This process's environment without the project's, Dagster's, AWS's and MLflow's variables,
    so a test's subprocess sees only what the test gives it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SAVIORREC_", "DAGSTER_", "AWS_", "MLFLOW_"))}


def project_env(home: Path, start_date: dt.date, train_days: int) -> dict[str, str]:
    """A command's environment for a project home with its own Dagster instance folder."""
    return {
        **isolated_environ(),
        "SAVIORREC_HOME": str(home),
        "SAVIORREC_START_DATE": start_date.isoformat(),
        "SAVIORREC_TRAIN_DAYS": str(train_days),
        "DAGSTER_HOME": str(home / "dagster"),
    }


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


def start_seaweedfs(
    workdir: Path, secret_key: str = "saviorrec-test-secret", ports: list[int] | None = None
) -> tuple[subprocess.Popen, S3Server]:
    """SeaweedFS master, volume, filer and S3 gateway in one `weed server`, with one identity; see
    `wait_for_s3`. Given the 8 `ports` and `workdir` of a stopped one, it starts again with its data."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = S3Server("", access_key="saviorrec-test", secret_key=secret_key)
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
    master, volume, filer, s3, *grpc = ports or free_ports(8)
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
        # Each bucket takes volumes 7 at a time, and overwritten objects (per-epoch training
        # checkpoints) hold their space until a vacuum: 32 ran out during test_integration's chain.
        "-master.volumeSizeLimitMB=64", "-volume.max=128",
        # One master: on a restart it waits this long (default 10 s, twice) before electing itself.
        "-master.electionTimeout=1s",
        f"-filer.localSocket={workdir}/filer.sock", f"-s3.localSocket={workdir}/s3.sock",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", server.access_key, server.secret_key)
    return process, server


def wait_for_s3(process: subprocess.Popen, server: S3Server, log: Path, timeout_s: float = 60) -> None:
    """Until the S3 gateway stores and returns an object (the bucket `readiness`)."""
    fs = s3fs.S3FileSystem(key=server.access_key, secret=server.secret_key, endpoint_url=server.endpoint_url, skip_instance_cache=True)

    def ready() -> bool:
        fs.pipe("readiness/probe", b"ok")
        return fs.cat("readiness/probe") == b"ok"

    wait_until(ready, "SeaweedFS S3 gateway", process, log, timeout_s)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"


def postgres_bin() -> Path:
    """Debian's PostgreSQL server binaries (the newest installed major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL not found in /usr/lib/postgresql: `apt-get install postgresql` (.ci/run does)")
    return Path(found[-1]).parent


def start_postgres(workdir: Path, user: str, password: str) -> tuple[subprocess.Popen, PostgresServer]:
    """A fresh cluster with password authentication, listening on loopback only.

    PostgreSQL refuses to run as root, so as root it runs as Debian's `postgres` user, in a
    folder that user owns.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    as_server_user: list[str] = []
    if os.geteuid() == 0:
        as_server_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(workdir, "postgres")
    data, password_file, log = workdir / "data", workdir / "password", workdir / "postgres.log"
    password_file.write_text(password)
    if as_server_user:
        shutil.chown(password_file, "postgres")
    bin_dir = postgres_bin()
    subprocess.run(
        [*as_server_user, str(bin_dir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={password_file}",
         "--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions"],
        check=True, capture_output=True,
    )
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*as_server_user, str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(workdir)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return process, PostgresServer("127.0.0.1", port, user, password)


def start_mlflow_server(
    workdir: Path, backend_store_uri: str, artifacts_destination: str, env: dict[str, str], port: int | None = None
) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on loopback (on `port`, or a free one) with the given backend store, proxying
    artifacts to their destination."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = workdir / "mlflow.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [executable("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir, env=env,
        )
    return process, f"http://127.0.0.1:{port}"


def start_model_server(workdir: Path, model_uri: str, env: dict[str, str], port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` of `model_uri` on loopback in this environment (`--env-manager local`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = workdir / "model-server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [executable("mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir, env=env,
        )
    return process, f"http://127.0.0.1:{port}"


# A loopback cluster for one test session: no token authentication (Ray turns it on where it finds
# a token that an earlier local Ray left in ~/.ray, and the driver must then present it).
RAY_TEST_ENV = {"RAY_AUTH_MODE": "disabled"}


def start_ray_head(num_cpus: int) -> tuple[subprocess.Popen, str, Path]:
    """`ray start --head --block` with `num_cpus` CPUs on loopback, its session files in a fresh
    short folder (Ray's sockets live there, and a socket path is at most 107 bytes); the process, the
    cluster's address and the folder."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    log = folder / "head.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [executable("ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--num-gpus", "0", "--port", str(port),
             "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(folder)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder, env={**isolated_environ(), **RAY_TEST_ENV},
        )
    address = f"127.0.0.1:{port}"
    wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None and b"Ray runtime started" in log.read_bytes(),
               "Ray head", process, log, timeout_s=120)
    return process, address, folder


def graphql(url: str, query: str, variables: dict | None = None, timeout_s: float = 30) -> dict:
    """POST one query to a Dagster webserver's `/graphql`; its `data`, or RuntimeError with its `errors`."""
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        body = json.loads(response.read())
    if body.get("errors"):
        raise RuntimeError(f"GraphQL errors: {json.dumps(body['errors'], indent=1)[:3000]}")
    return body["data"]


def start_dagster_dev(workspace: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """`dagster dev -w workspace` on a free loopback port, from the workspace's folder: the webserver,
    the daemon (which dequeues and launches runs) and one code server they share, in one process
    group (stop it with `stop`). Returns the process and the UI's URL; see `wait_for_dagster`."""
    port = free_port()
    command = [executable("dagster"), "dev", "-w", str(workspace), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=workspace.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, f"http://127.0.0.1:{port}"


_LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def wait_for_dagster(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Until the webserver answers and every code location of its workspace has loaded; fails at
    once if the process exits or a location fails to load, with the tail of the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dagster exited with {process.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        try:
            entries = graphql(url, _LOCATIONS, timeout_s=5)["workspaceOrError"].get("locationEntries") or []
        except OSError:  # not listening yet
            entries = []
        for entry in entries:
            error = entry["locationOrLoadError"] or {}
            if error.get("__typename") == "PythonError":
                raise RuntimeError(f"code location {entry['name']} failed to load:\n{error['message'][-3000:]}")
        if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
            return
        time.sleep(0.5)
    raise TimeoutError(f"dagster at {url} not ready after {timeout_s}s; log {log}:\n{log.read_text()[-3000:]}")
