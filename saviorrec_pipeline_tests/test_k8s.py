"""The Kubernetes configuration (deploy/k8s/) loads as Dagster and Kubernetes read it.

There is no cluster and no Helm here. What the chart makes of values.yaml is restated below from
its templates (the instance ConfigMap and the code location's container context, chart 1.13), only
for the keys values.yaml sets; everything after that is dagster-k8s' own code: the instance schema,
the run launcher, the executor building each step's Kubernetes Job from deploy/k8s/executor.yaml.
"""

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from kubernetes import client as k8s

from saviorrec_pipeline.assets.common import TRAINING_POOL
from saviorrec_pipeline_tests.deployment_files import REPO, env_example
from saviorrec_pipeline_tests.services import isolated_environ

pytestmark = pytest.mark.integration

K8S = REPO / "deploy" / "k8s"
# Release and namespace as in deploy/k8s/README.md; the chart names things after them.
RELEASE = NAMESPACE = "saviorrec"
FULLNAME = f"{RELEASE}-dagster"  # the chart's "dagster.fullname"
TRAINING_STEPS = {"item_encoder", "i2i_retrieval", "semantic_ids", "rq_comparison", "ctr_model", "ctr_ablations", "mba_dimensions"}
GPU = "nvidia.com/gpu"


def _values() -> dict:
    return yaml.safe_load((K8S / "values.yaml").read_text())


def _code_location(values: dict) -> dict:
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return deployment


def _env(deployment: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in deployment["env"]}


def _mlflow() -> tuple[dict, dict]:
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((K8S / "mlflow.yaml").read_text())}
    assert docs.keys() == {"Deployment", "Service"}
    return docs["Deployment"], docs["Service"]


def _chart_instance(values: dict) -> dict:
    """dagster.yaml as the chart renders it (templates/configmap-instance.yaml and helpers/instance/)."""
    pg = values["postgresql"]
    postgres = {
        "postgres_db": {
            "username": pg["postgresqlUsername"],
            "password": {"env": "DAGSTER_PG_PASSWORD"},  # from global.postgresqlSecretName
            "hostname": pg["postgresqlHost"],
            "db_name": pg["postgresqlDatabase"],
            "port": pg["service"]["port"],
            "params": pg.get("postgresqlParams", {}),
            **({"scheme": pg["postgresqlScheme"]} if pg.get("postgresqlScheme") else {}),
        }
    }
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher_config = {
        "load_incluster_config": launcher["loadInclusterConfig"],
        "job_namespace": launcher.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": launcher.get("imagePullPolicy", "Always"),
        "service_account_name": FULLNAME,
        "dagster_home": values.get("global", {}).get("dagsterHome", "/opt/dagster/dagster_home"),
        "instance_config_map": f"{FULLNAME}-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
    }
    for key, name in (("envConfigMaps", "env_config_maps"), ("envSecrets", "env_secrets")):
        if launcher.get(key):
            launcher_config[name] = [item["name"] for item in launcher[key]]
    concurrency = values.get("concurrency", {})  # rendered only when enabled, keys in snake_case
    snake = lambda key: re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()  # noqa: E731
    rendered_concurrency = {
        section: {snake(key): value for key, value in concurrency[section].items()}
        for section in ("pools", "runs")
        if concurrency.get("enabled") and concurrency.get(section)
    }
    storage = lambda module, cls: {"module": f"dagster_postgres.{module}", "class": cls, "config": postgres}  # noqa: E731
    instance = {
        "scheduler": {"module": "dagster._core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": storage("schedule_storage", "PostgresScheduleStorage"),
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher_config},
        "run_storage": storage("run_storage", "PostgresRunStorage"),
        "event_log_storage": storage("event_log", "PostgresEventLogStorage"),
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator", "config": {}},
        "telemetry": {"enabled": values.get("telemetry", {}).get("enabled", True)},
    }
    if rendered_concurrency:
        instance["concurrency"] = rendered_concurrency
    return instance


def _container_context(deployment: dict) -> dict:
    """What the code location hands its runs (dagster-user-deployments' k8sContainerContext helper)."""
    context = {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [f"{FULLNAME}-{deployment['name']}-user-env", *[c["name"] for c in deployment.get("envConfigMaps", [])]],
        "namespace": NAMESPACE,
        "service_account_name": f"{FULLNAME}-user-deployments",
    }
    if deployment.get("envSecrets"):
        context["env_secrets"] = [secret["name"] for secret in deployment["envSecrets"]]
    if isinstance(deployment.get("env"), list):
        context["env"] = deployment["env"]
    return {"k8s": context}


def _image(deployment: dict) -> str:
    return f"{deployment['image']['repository']}:{deployment['image']['tag']}"


def print_k8s_step_jobs() -> None:
    """In a process started with SAVIORREC_K8S_EXECUTOR_CONFIG set: the chain job's executor, and the
    Kubernetes Job it would create for each step of a run launched from the chart's code location,
    printed as JSON. Only the Kubernetes API is replaced (it records the Jobs)."""
    import kubernetes
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.events import DagsterEvent
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.instance_for_test import instance_for_test
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.system_config.objects import ResolvedRunConfig
    from dagster_k8s.client import DagsterKubernetesClient

    created = []

    class RecordingApi:
        def create_namespaced_job_with_retries(self, body, namespace):
            created.append((namespace, body))

    kubernetes.config.load_incluster_config = lambda *args, **kwargs: None  # no cluster here
    DagsterKubernetesClient.production_client = staticmethod(lambda **kwargs: RecordingApi())
    DagsterEvent.step_worker_starting = staticmethod(lambda *args, **kwargs: None)  # wants a live step context

    from saviorrec_pipeline.definitions import defs

    values = _values()
    deployment = _code_location(values)
    job = defs.resolve_job_def("saviorrec_chain")
    origin = JobPythonOrigin(
        job.name,
        RepositoryPythonOrigin(
            executable_path="/usr/local/bin/python",
            code_pointer=ModuleCodePointer("saviorrec_pipeline.definitions", "defs", "/opt/saviorrec"),
            container_image=_image(deployment),  # DAGSTER_CURRENT_IMAGE, set by the chart
            container_context=_container_context(deployment),
        ),
    )
    run = DagsterRun(job_name=job.name, run_id=str(uuid.uuid4()), job_code_origin=origin, tags={"dagster/partition": "2025-07-22"})
    with instance_for_test(overrides={"run_launcher": _chart_instance(values)["run_launcher"]}) as instance:
        assert isinstance(instance.run_launcher, K8sRunLauncher)
        executor = job.executor_def.executor_creation_fn(
            InitExecutorContext(
                job=InMemoryJob(job),
                executor_def=job.executor_def,
                executor_config=ResolvedRunConfig.build(job, {}).execution.execution_engine_config,
                instance=instance,
            )
        )
        handler = executor._step_handler
        for node in job.nodes_in_topological_order:
            # The parts of a StepHandlerContext that K8sStepHandler.launch_step reads.
            args = SimpleNamespace(
                step_keys_to_execute=[node.name], run_id=run.run_id, known_state=None, job_origin=origin,
                get_command_args=lambda skip_serialized_namedtuple=False: ["dagster", "api", "execute_step"],
                get_command_env=lambda: [],
            )
            context = SimpleNamespace(
                execute_step_args=args, dagster_run=run, instance=instance, step_tags={node.name: node.tags},
                get_step_context=lambda key: SimpleNamespace(step=SimpleNamespace(op_name=key)),
            )
            list(handler.launch_step(context))
    api = kubernetes.client.ApiClient()
    print(json.dumps({
        "executor": job.executor_def.name,
        "jobs": {body.metadata.labels["dagster/op"]: {"namespace": ns, **api.sanitize_for_serialization(body)} for ns, body in created},
    }))


def _python(code: str, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def _pipeline_env() -> dict[str, str]:
    env = isolated_environ()
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"}


def test_executor_file_is_a_k8s_job_executor_config_for_exactly_the_training_stages():
    config = yaml.safe_load((K8S / "executor.yaml").read_text())
    result = process_config(k8s_job_executor.config_schema.config_type, config)
    assert result.success, [error.message for error in result.errors]
    from saviorrec_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    pooled = [graph.get(key) for key in graph.get_all_asset_keys() if TRAINING_POOL in graph.get(key).pools]
    training_ops = {node.assets_def.node_def.name for node in pooled}
    assert training_ops == TRAINING_STEPS
    assert config["per_step_k8s_config"].keys() == training_ops


def test_default_mode_runs_steps_in_process_without_dagster_k8s():
    code = (
        "import sys; sys.modules['dagster_k8s'] = None\n"  # any import of it fails
        "from saviorrec_pipeline.definitions import defs\n"
        "print(defs.resolve_job_def('saviorrec_chain').executor_def.name)"
    )
    assert _python(code, _pipeline_env()) == "in_process"


def test_k8s_mode_runs_each_step_as_a_job_and_only_training_steps_on_gpu_nodes():
    values = _values()
    deployment = _code_location(values)
    env = {**_pipeline_env(), "SAVIORREC_K8S_EXECUTOR_CONFIG": str(K8S / "executor.yaml")}
    out = json.loads(_python("from saviorrec_pipeline_tests.test_k8s import print_k8s_step_jobs; print_k8s_step_jobs()", env))
    assert out["executor"] == "saviorrec_k8s"
    jobs = out["jobs"]
    from saviorrec_pipeline.definitions import defs

    assert set(jobs) == {node.name for node in defs.resolve_job_def("saviorrec_chain").nodes_in_topological_order}
    assert TRAINING_STEPS & set(jobs) == {"item_encoder", "semantic_ids", "ctr_model"}
    secrets = {secret["name"] for secret in deployment["envSecrets"]}
    for step, job in jobs.items():
        assert job["namespace"] == NAMESPACE
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == _image(deployment), step
        # The code location's Secret and environment reach every step pod.
        assert secrets <= {source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source}, step
        assert _env(deployment).items() <= {item["name"]: item.get("value") for item in container["env"]}.items(), step
        resources = container["resources"]
        gpus = {section: amounts.get(GPU) for section, amounts in resources.items()}
        tolerated = {toleration["key"] for toleration in pod.get("tolerations") or []}
        if step in TRAINING_STEPS:
            assert gpus["limits"] == "1", step
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, step
            assert GPU in tolerated, step
        else:
            assert set(gpus.values()) == {None}, step
            assert not pod.get("nodeSelector") and GPU not in tolerated, step
            assert resources["requests"]["cpu"] and resources["limits"]["memory"], step


def test_chart_instance_is_valid_and_has_the_limits_of_deploy_dagster_yaml(tmp_path, monkeypatch):
    values = _values()
    instance = _chart_instance(values)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "x")
    config, _ = dagster_instance_config(str(tmp_path))
    launcher = process_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert launcher.success, [error.message for error in launcher.errors]
    # The same queue and pool limits as the compose deployment's instance file.
    compose_instance = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    assert config["concurrency"] == compose_instance["concurrency"]
    assert config["run_coordinator"]["class"] == compose_instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["telemetry"] == compose_instance["telemetry"]
    # The same database driver: the image has psycopg2 only.
    scheme = compose_instance["storage"]["postgres"]["postgres_db"]["scheme"]
    assert all(config[part]["config"]["postgres_db"].get("scheme") == scheme for part in ("run_storage", "event_log_storage", "schedule_storage"))
    # The chart refuses run limits set both here and on the run coordinator, and renders the
    # run_coordinator section only with the daemon's coordinator enabled (its default).
    daemon = values.get("dagsterDaemon", {})
    assert daemon.get("enabled", True) and daemon.get("runCoordinator", {}).get("enabled", True)
    assert not daemon.get("runCoordinator", {}).get("config", {}).get("queuedRunCoordinator")
    # External Postgres, the database and user of .env; its password only in the Secret.
    env = env_example()
    assert values["postgresql"]["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in values["postgresql"]
    assert (values["postgresql"]["postgresqlUsername"], values["postgresql"]["postgresqlDatabase"]) == (
        env["POSTGRES_USER"], env["DAGSTER_POSTGRES_DB"])


def test_every_variable_the_pipeline_reads_reaches_its_pods():
    deployment = _code_location(_values())
    read = set()
    for source in (REPO / "saviorrec_pipeline").rglob("*.py"):
        read |= set(re.findall(r"[\"']((?:SAVIORREC|MLFLOW|AWS|DAGSTER)_[A-Z0-9_]+)[\"']", source.read_text()))
    assert {"SAVIORREC_RAW_ROOT", "MLFLOW_TRACKING_URI", "SAVIORREC_K8S_EXECUTOR_CONFIG"} <= read, "the pattern is wrong"
    secret_keys = env_example().keys()  # kubectl create secret generic ... --from-env-file=.env
    env = _env(deployment)
    # DAGSTER_HOME is the chart's; AWS_ENDPOINT_URL is for an S3-compatible store only (AWS S3 has none).
    optional = {"DAGSTER_HOME", "AWS_ENDPOINT_URL"}
    missing = (read | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}) - optional - env.keys() - secret_keys
    assert not missing, f"not set in values.yaml nor in the Secret: {sorted(missing)}"
    assert "AWS_ENDPOINT_URL" in (K8S / "values.yaml").read_text()
    # $(VAR) expands from the Secret and from the variables above it.
    defined = set(secret_keys)
    for name, value in env.items():
        unresolved = set(re.findall(r"\$\((\w+)\)", value)) - defined
        assert not unresolved, f"{name} refers to {unresolved}"
        defined.add(name)
    assert env["SAVIORREC_RAW_ROOT"].startswith("s3://") and env["SAVIORREC_STORAGE_ROOT"].startswith("s3://")
    assert Path(env["SAVIORREC_K8S_EXECUTOR_CONFIG"]).name == "executor.yaml"


def test_values_and_mlflow_manifest_hold_no_secret():
    secrets = {k: v for k, v in env_example().items() if "PASSWORD" in k or "SECRET" in k}
    for path in (K8S / "values.yaml", K8S / "mlflow.yaml"):
        text = path.read_text()
        for key, value in secrets.items():
            assert value not in text, f"{key}'s value is written in {path.name}"
        assert not re.search(r"(?im)^[\s-]*\w*(password|secret\w*key):\s*\S", text), f"a secret is set literally in {path.name}"


def test_k8s_image_is_the_compose_image():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    image = compose["x-pipeline"]["image"]
    assert _image(_code_location(_values())) == image
    mlflow_deployment, _ = _mlflow()
    assert mlflow_deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image


def test_image_has_dagster_k8s_and_the_executor_file():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    dockerfile = (REPO / compose["x-pipeline"]["build"]["dockerfile"]).read_text()
    extras = re.search(r"pip install [\"']?\.\[([^\]]*)\]", dockerfile)
    assert extras and "k8s" in {extra.strip() for extra in extras.group(1).split(",")}, "the image lacks the `k8s` extra (dagster-k8s)"
    wanted = _env(_code_location(_values()))["SAVIORREC_K8S_EXECUTOR_CONFIG"]
    source = _copied_into_image(dockerfile, wanted)
    assert source and source.resolve() == (K8S / "executor.yaml").resolve(), f"deploy/Dockerfile copies no executor.yaml to {wanted}"


def _copied_into_image(dockerfile: str, path: str) -> Path | None:
    """The repository file that the Dockerfile's COPY lines put at `path` in the image, if any."""
    workdir, found = Path("/"), None
    for line in dockerfile.splitlines():
        words = [word for word in line.split() if not word.startswith("--")]
        if words[:1] == ["WORKDIR"]:
            workdir = workdir / words[1]
        if words[:1] != ["COPY"] or len(words) < 3:
            continue
        *sources, dest = words[1:]
        target = workdir / dest
        for source in sources:
            if (REPO / source).is_dir() and Path(path).is_relative_to(target):
                found = REPO / source / Path(path).relative_to(target)
            elif target / Path(source).name == Path(path) and (dest.endswith("/") or len(sources) > 1):
                found = REPO / source
            elif target == Path(path) and len(sources) == 1:
                found = REPO / source
    return found if found and found.is_file() else None


def test_mlflow_manifest_is_valid_and_is_the_tracking_uri_of_values():
    values = _values()
    deployment, service = _mlflow()
    k8s_model_from_dict(k8s.V1Deployment, k8s_snake_case_dict(k8s.V1Deployment, deployment))
    k8s_model_from_dict(k8s.V1Service, k8s_snake_case_dict(k8s.V1Service, service))
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    tracking = re.fullmatch(r"http://([\w-]+):(\d+)", _env(_code_location(values))["MLFLOW_TRACKING_URI"])
    assert tracking and tracking.group(1) == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == int(tracking.group(2))
    (container,) = pod["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    # Credentials from the pipeline's Secret; every $VAR of the command is defined.
    secrets = {source["secretRef"]["name"] for source in container["envFrom"]}
    assert secrets == {secret["name"] for secret in _code_location(values)["envSecrets"]}
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    command = " ".join(container["command"])
    used = set(re.findall(r"\$(\w+)", command))
    assert used and not used - env.keys() - env_example().keys(), used - env.keys() - env_example().keys()
    assert env["MLFLOW_POSTGRES_HOST"] == values["postgresql"]["postgresqlHost"]
    assert "--artifacts-destination \"s3://$MLFLOW_BUCKET/" in command
    assert '--backend-store-uri "postgresql+psycopg2://' in command  # the driver the image has
    assert f"{service['metadata']['name']}:*" in command  # the Host header other pods send is allowed


def test_raycluster_is_valid_and_is_the_ray_address_of_values():
    (cluster,) = yaml.safe_load_all((K8S / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"], cluster["metadata"]["namespace"]) == ("ray.io/v1", "RayCluster", NAMESPACE)
    spec = cluster["spec"]
    head, groups = spec["headGroupSpec"], spec["workerGroupSpecs"]
    assert {group["groupName"] for group in groups} == {"cpu", "gpu"}
    deployment = _code_location(_values())
    image = _image(deployment)
    for template in [head["template"], *(group["template"] for group in groups)]:
        k8s_model_from_dict(k8s.V1PodTemplateSpec, k8s_snake_case_dict(k8s.V1PodTemplateSpec, template))
        (container,) = template["spec"]["containers"]
        assert container["image"] == image, "Ray's workers must import the pipeline code of the steps that drive them"
        assert {source["secretRef"]["name"] for source in container["envFrom"]} == {s["name"] for s in deployment["envSecrets"]}
    # KubeRay passes rayStartParams to `ray start` as --key value strings.
    for params in [head["rayStartParams"], *(group["rayStartParams"] for group in groups)]:
        assert all(isinstance(value, str) for value in params.values()), params
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head schedules; the workers compute
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu = next(group for group in groups if group["groupName"] == "gpu")["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"][GPU] == "1"
    gpu_step = yaml.safe_load((K8S / "executor.yaml").read_text())["per_step_k8s_config"]["ctr_model"]["pod_spec_config"]
    assert gpu["nodeSelector"] == gpu_step["node_selector"] and gpu["tolerations"] == gpu_step["tolerations"]
    # The code location reaches the head's Service (KubeRay names it <name>-head-svc) on its client port.
    ports = {port["name"]: port["containerPort"] for port in head["template"]["spec"]["containers"][0]["ports"]}
    address = _env(deployment)["SAVIORREC_RAY_ADDRESS"]
    assert address == f"ray://{cluster['metadata']['name']}-head-svc:{ports['client']}"
    # The Ray of the image: rayVersion names a version pyproject.toml allows.
    pin = re.search(r'"ray\[[^\]]*\]>=(\d+)\.(\d+),<(\d+)"', (REPO / "pyproject.toml").read_text())
    major, minor = map(int, spec["rayVersion"].split(".")[:2])
    assert pin and (int(pin.group(1)), int(pin.group(2))) <= (major, minor) and major < int(pin.group(3))
    readme = (K8S / "README.md").read_text()
    assert "apply -f deploy/k8s/raycluster.yaml" in readme and "kuberay-operator" in readme


def test_install_steps_name_the_files_secrets_and_chart_version():
    readme = (K8S / "README.md").read_text()
    deployment = _code_location(_values())
    (secret,) = deployment["envSecrets"]
    assert f"create secret generic {secret['name']} --from-env-file=.env" in readme
    pg_secret = _values()["global"]["postgresqlSecretName"]
    assert f"create secret generic {pg_secret} --from-literal=postgresql-password=" in readme
    install = re.search(r"helm upgrade --install (\S+) dagster/dagster[^\n]*", readme)
    assert install and install.group(1) == RELEASE and "-f deploy/k8s/values.yaml" in install.group(0)
    assert f"--namespace {NAMESPACE}" in install.group(0)
    chart = re.search(r"--version (\d+)\.(\d+)\.\d+", install.group(0))
    assert chart and chart.groups() == tuple(dg.__version__.split(".")[:2]), "chart and dagster versions differ"
    assert "deploy/k8s/mlflow.yaml" in readme
