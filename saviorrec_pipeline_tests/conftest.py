import os
import shutil
import signal

import pytest
import s3fs

from saviorrec_pipeline_tests.services import RAY_TEST_ENV, S3Server, start_ray_head, start_seaweedfs, stop, wait_for_s3


KINDS = {"unit", "integration"}
# Fixtures that start a real service; a unit test must not reach one, even through another fixture.
SERVICE_FIXTURES = {"s3_server", "s3", "mlflow_server", "postgres", "dagster_ui", "model_server", "ray_cluster"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test is marked either unit or integration, so `-m unit` is the whole fast set."""
    wrong = []
    for item in items:
        kinds = KINDS & {mark.name for mark in item.iter_markers()}
        if len(kinds) != 1:
            wrong.append(f"{item.nodeid}: marked {sorted(kinds) or 'neither'}; mark it unit or integration")
        elif kinds == {"unit"} and SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            wrong.append(f"{item.nodeid}: marked unit but starts a service ({sorted(SERVICE_FIXTURES & set(item.fixturenames))})")
    if wrong:
        raise pytest.UsageError("test markers:\n" + "\n".join(wrong))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """A SeaweedFS S3 gateway on loopback for the whole session, with credentials."""
    workdir = tmp_path_factory.mktemp("seaweedfs")
    process, server = start_seaweedfs(workdir)
    try:
        wait_for_s3(process, server, workdir / "weed.log")
        yield server
    finally:
        stop(process, timeout_s=5)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this test's s3fs (through the standard AWS variables) at the test server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_root(s3_env: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh `s3://bucket/prefix` for one test."""
    fs = s3fs.S3FileSystem()
    bucket = "saviorrec-tests"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return f"s3://{bucket}/{request.node.name.replace('[', '-').replace(']', '')}-{os.getpid()}"


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """A local Ray cluster of 2 CPUs for the whole session, this process connected to it as a
    driver; its address. Shut down and stopped by its pid at the end."""
    import ray

    process, address, folder = start_ray_head(num_cpus=2)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in RAY_TEST_ENV.items():
                patch.setenv(name, value)
            ray.init(address=address, log_to_driver=False)
            yield address
    finally:
        ray.shutdown()
        # `ray start --block` takes tens of seconds over SIGTERM; the cluster keeps nothing worth
        # a clean exit, so its whole process group is killed at once.
        stop(process, timeout_s=10, sig=signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
