"""The Dagster UI in a real browser: `dagster dev` on demo data, driven by Debian's Chromium.

One `dagster dev` (webserver, daemon and a shared code server, as README's "Using it" starts it)
serves the module. The tests read what the pages render, launch a run the way the UI's
Materialize button does (the same GraphQL mutation) and follow it to its run page. Screenshots go
to $SAVIORREC_TEST_ARTIFACTS (default: test-artifacts/ui/ in the checkout).
"""

import datetime as dt
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from saviorrec_pipeline.demo import DemoSpec, generate_demo
from saviorrec_pipeline_tests.deployment_files import REPO
from saviorrec_pipeline_tests.services import graphql, project_env, start_dagster_dev, stop, wait_for_dagster

pytestmark = pytest.mark.integration

ARTIFACTS = Path(os.environ.get("SAVIORREC_TEST_ARTIFACTS") or REPO / "test-artifacts" / "ui")

START = dt.date(2025, 7, 1)
DAYS = 5
LAST_DAY = START + dt.timedelta(days=DAYS - 1)  # 2025-07-05

STAGES = (
    "impressions", "item_catalog", "user_profiles", "coclick_pairs", "item_encoder", "item_embeddings",
    "i2i_retrieval", "embedding_map", "semantic_ids", "rq_comparison", "ranking_dataset", "ctr_model", "ctr_ablations", "mba_dimensions",
    "champion_gate", "auc_report", "ablation_report",
)
CHEAP_STAGES = ("impressions", "item_catalog", "user_profiles", "coclick_pairs")

CHROMIUM = "/usr/bin/chromium"
# Without the networking switches Chromium hangs on a closed network, reaching for Google's services.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
UI_TIMEOUT_MS = 30_000
RUN_TIMEOUT_S = 240


@dataclass(frozen=True)
class DagsterUI:
    url: str
    home: Path  # SAVIORREC_HOME
    log: Path  # `dagster dev`'s stdout and stderr

    def log_tail(self, chars: int = 4000) -> str:
        return f"--- tail of {self.log} ---\n{self.log.read_text(errors='replace')[-chars:]}"

    @contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Fail with the tail of the server's log when a check (a page's or ours) or a call fails."""
        try:
            yield
        except Exception as error:
            raise AssertionError(f"{type(error).__name__}: {error}\n{self.log_tail()}") from error


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterUI]:
    home = tmp_path_factory.mktemp("ui") / "home"
    generate_demo(home / "raw", DemoSpec(start_date=START, days=DAYS, users=200, items=300, seed=5))
    # With DAGSTER_HOME set, Dagster reads the instance file there, not the one in the checkout:
    # copy the embedded default in, so runs queue and pools are limited as the project configures.
    instance_file = REPO / "dagster.yaml"
    assert instance_file.is_file(), f"{instance_file} (the embedded default instance) is missing"
    (home / "dagster").mkdir(parents=True)
    shutil.copyfile(instance_file, home / "dagster" / "dagster.yaml")

    log = home / "dagster-dev.log"
    process, url = start_dagster_dev(REPO / "workspace.yaml", project_env(home, START, train_days=DAYS - 1), log)
    try:
        wait_for_dagster(url, process, log)
        graphql(url, "mutation { setNuxSeen }")  # no "Join the Dagster community" dialog over the pages
        print(f"dagster dev at {url}, log {log}")
        yield DagsterUI(url, home, log)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: the UI tests drive Debian's Chromium (`apt-get install chromium`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)  # so the checks below see this run's picture
    page.screenshot(path=path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, f"{path}: {len(data)} bytes, not a real page"
    print(f"screenshot: {path}")
    return path


def _visible(page: Page, text: str) -> None:
    expect(page.get_by_text(text, exact=True).first, f"{text!r} is not shown on {page.url}").to_be_visible(
        timeout=UI_TIMEOUT_MS
    )


def test_asset_graph_shows_every_stage_and_the_daily_partitions(dagster_ui: DagsterUI, page: Page):
    with dagster_ui.logs_on_failure():
        nodes = graphql(dagster_ui.url, "{ assetNodes { groupName assetKey { path } } }")["assetNodes"]
        groups: dict[str, list[str]] = {}
        for node in nodes:
            groups.setdefault(node["groupName"], []).append(node["assetKey"]["path"][-1])
        assert sorted(name for names in groups.values() for name in names) == sorted(STAGES)
        # Each group's lineage shows its stages (the global graph no longer fits one screen at the
        # zoom where names are drawn, and the UI draws only the nodes on screen).
        for group, names in groups.items():
            page.goto(f"{dagster_ui.url}/locations/__repository__@saviorrec_pipeline/asset-groups/{group}")
            for stage in names:
                _visible(page, stage)
        # The global lineage, every asset group expanded (`expanded` holds group ids; both forms of
        # them, with and without Dagster's per-code-location grouping, so either layout opens).
        expanded = [f"global@global:{g}" for g in sorted(groups)] + [
            f"__repository__@saviorrec_pipeline:{g}" for g in sorted(groups)
        ]
        page.goto(f"{dagster_ui.url}/asset-groups?expanded={','.join(expanded)}")
        expect(page.get_by_text("Global asset lineage")).to_be_visible()
        _visible(page, "ranking_dataset")
        _screenshot(page, "asset-graph.png")

        # The daily partitions from SAVIORREC_START_DATE, listed on an asset's partitions page.
        page.goto(f"{dagster_ui.url}/assets/coclick_pairs?view=partitions")
        page.get_by_placeholder("Filter by name…").fill("2025-07-0")
        for day in range(DAYS):
            _visible(page, (START + dt.timedelta(days=day)).isoformat())
        expect(page.get_by_text("2025-06-30", exact=True)).to_have_count(0)  # nothing before the start date


def test_automation_page_shows_the_daily_schedule_and_the_sensor_switched_off(dagster_ui: DagsterUI, page: Page):
    with dagster_ui.logs_on_failure():
        page.goto(f"{dagster_ui.url}/automation")
        for name in ("daily_retrain", "raw_day_landed"):
            _visible(page, name)
        page.wait_for_load_state("networkidle")  # the rows' states and next ticks
        _screenshot(page, "automation.png")
        # The sensor's page: its switch is there, off by default.
        page.goto(f"{dagster_ui.url}/locations/saviorrec_pipeline/sensors/raw_day_landed")
        switch = page.get_by_role("checkbox")
        expect(switch).to_have_count(1)
        expect(switch).to_be_enabled()
        expect(switch).not_to_be_checked()


_LAUNCH_RUN = """
mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } }
} }
"""

_RUN_STATUS = """query($runId: ID!) { runOrError(runId: $runId) { ... on Run { status } } }"""

_RUN_ERRORS = """
query($runId: ID!) { runOrError(runId: $runId) { ... on Run { eventConnection { events {
    __typename
    ... on MessageEvent { message level stepKey }
    ... on ErrorEvent { error { message errorChain { error { message stack } } } }
} } } } }
"""


def _launch_partition_run(url: str, assets: tuple[str, ...], partition: str) -> str:
    """What the UI's Materialize button sends for one partition of the selected assets: the implicit
    asset job, the asset selection and the partition tag."""
    params = {
        "selector": {
            "repositoryLocationName": "saviorrec_pipeline",
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [asset]} for asset in assets],
        },
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
    }
    result = graphql(url, _LAUNCH_RUN, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", f"launchRun refused: {json.dumps(result, indent=1)}"
    return result["run"]["runId"]


def _wait_for_run(url: str, run_id: str) -> str:
    """The run's final status (queued runs start when the daemon dequeues them)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        status = graphql(url, _RUN_STATUS, {"runId": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        if time.monotonic() > deadline:
            hint = " (is the daemon dequeuing runs?)" if status == "QUEUED" else ""
            raise AssertionError(f"run {run_id} still {status} after {RUN_TIMEOUT_S}s{hint}")
        time.sleep(1)


def _run_errors(url: str, run_id: str) -> str:
    """The run's error events: each message, then its causes (the innermost with its stack)."""
    lines = []
    for event in graphql(url, _RUN_ERRORS, {"runId": run_id})["runOrError"]["eventConnection"]["events"]:
        error = event.get("error")
        if event.get("level") != "ERROR" and not error:
            continue
        lines.append(f"{event['__typename']} {event.get('stepKey') or ''}: {event.get('message', '')}")
        chain = [link["error"] for link in (error or {}).get("errorChain") or []]
        lines += [f"  caused by: {cause['message'].strip()}" for cause in chain]
        if chain:
            lines.append("".join(chain[-1]["stack"][-4:]))
    return "\n".join(lines) or "(no error events)"


def test_materializing_one_partition_from_the_ui_writes_its_parquet_and_shows_success(dagster_ui: DagsterUI, page: Page):
    with dagster_ui.logs_on_failure():
        run_id = _launch_partition_run(dagster_ui.url, CHEAP_STAGES, LAST_DAY.isoformat())
        status = _wait_for_run(dagster_ui.url, run_id)
        assert status == "SUCCESS", f"run {run_id} ended {status}:\n{_run_errors(dagster_ui.url, run_id)}"

        output = dagster_ui.home / "storage" / "coclick_pairs" / f"{LAST_DAY}.parquet"
        assert output.is_file(), f"{output} not written by run {run_id}"

        page.goto(f"{dagster_ui.url}/runs/{run_id}")
        _visible(page, "Success")
        _visible(page, f"partition: {LAST_DAY}")
        expect(page.get_by_text("Succeeded (4)")).to_be_visible()  # one step per asset
        _screenshot(page, "run-succeeded.png")

        # The asset's partitions page lists the day as materialized, by this run, at that file.
        page.goto(f"{dagster_ui.url}/assets/coclick_pairs?view=partitions&status=MATERIALIZED&partition={LAST_DAY}")
        expect(page.get_by_text("Materialized (1)")).to_be_visible()
        _visible(page, LAST_DAY.isoformat())
        _visible(page, run_id[:8])
        _visible(page, str(output))
