"""The dashboard in a real browser: Playwright drives Debian's Chromium (headless) against
`emu dashboard` started by the test, with a real retrain (the whole pipeline on a fast tiny
preset, in its own process) that the page shows progressing to the end.

Screenshots are kept in test-artifacts/dashboard/ (or $EMU_TEST_ARTIFACTS/dashboard/)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from emu.dashboard.auth import hash_password
from tests.integration.test_pipeline import fast_preset

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "browser test password"
#: The retrain is the whole pipeline on two CPU cores.
RUN_TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium: apt-get install chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """`emu dashboard` on a free loopback port, over a fresh EMU_HOME, with user alice."""
    home = tmp_path_factory.mktemp("dashboard-home")
    preset = fast_preset(home)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("EMU_LINEAGE_URL", "EMU_DVC_REMOTE", "EMU_RUN_ID",
                                                              "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(EMU_HOME=str(home), EMU_DASHBOARD_SECRET="browser-test",
               EMU_DASHBOARD_USERS=f"alice:{hash_password(PASSWORD, iterations=200_000)}")
    log = open(home / "dashboard.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "emu.cli", "dashboard", "--port", str(port),
                               "--set", f"presets=[{preset}]"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start: {(home / 'dashboard.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield {"url": url, "home": home, "preset": preset.stem}
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots():
    folder = Path(os.environ.get("EMU_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_retrain_watch_charts_images_lineage_schedules_audit(dashboard, browser, shots):
    url = dashboard["url"]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url + "/runs")
    assert "No runs" in page.inner_text("#runs-table")

    # Writes need a login: the retrain link sends us to the login form first.
    page.click("text=Retrain")
    assert "/login" in page.url
    page.fill("#username", "alice")
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_url("**/retrain")
    assert page.inner_text("#current-user") == "alice"

    # Retrain on the fast tiny preset; a double click submits the same idempotency key twice.
    page.select_option("#preset", dashboard["preset"])
    page.fill("#overrides", "stage2.lr=0.002")
    page.screenshot(path=str(shots / "retrain-form.png"), full_page=True)
    page.dblclick("#retrain-submit")
    page.wait_for_url("**/runs/run-*")
    run_id = page.url.rsplit("/", 1)[1]
    assert page.inner_text("#run-trigger").startswith("dashboard · alice")
    page.screenshot(path=str(shots / "run-started.png"), full_page=True)

    # The page refreshes itself while the run is active; wait for the end, as a user would.
    deadline = time.monotonic() + RUN_TIMEOUT_S
    seen = set()  # stage states shown while the run was active
    while (status := page.inner_text("#run-status")) in ("pending", "running"):
        seen.update(page.eval_on_selector_all("#stage-graph g.node", "nodes => nodes.map(n => n.classList[2])"))
        assert time.monotonic() < deadline, f"run {run_id} still {status} after {RUN_TIMEOUT_S} s"
        page.wait_for_timeout(2000)
        page.reload()
    log_text = page.inner_text("#run-log") if page.query_selector("#run-log") else ""
    assert status == "succeeded", f"run {run_id} {status}: {page.inner_text('main')[:1500]}\n{log_text[-1500:]}"
    assert {"st-succeeded", "st-waiting"} <= seen, f"progress was shown stage by stage: {seen}"

    # The finished run: every stage in the graph, loss curves drawn, samples rendered.
    assert page.locator("#stage-graph g.node.st-succeeded").count() == 8
    assert page.locator("#stage-graph g.node").count() == 9
    assert page.locator("#curves-stage1 svg polyline.series").count() >= 2
    assert page.locator("#curves-stage2 polyline[data-series='image_loss']").count() == 1
    images = page.eval_on_selector_all("img.sample", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
    assert len(images) >= 6 and all(width and width > 0 for width in images), images
    assert "vqav2_accuracy" in page.inner_text("#evaluation-table")
    assert f"emu artifacts pull {run_id}" in page.inner_text("#restore-command")
    assert "evaluate" in page.inner_text("#artifacts-table")
    page.screenshot(path=str(shots / "run-finished.png"), full_page=True)

    page.goto(url + "/runs")
    assert page.locator("tr.run-row").count() == 1, "the double submit started one run"
    page.screenshot(path=str(shots / "runs.png"), full_page=True)

    # Lineage: from the run to its data shards, navigable to an artifact's own lineage.
    page.goto(f"{url}/lineage?target={run_id}")
    assert page.locator("#lineage-graph g.node.type-dataset").count() >= 2
    page.screenshot(path=str(shots / "lineage.png"), full_page=True)
    page.locator("#lineage-graph a:has(g.node.type-model)").first.click()
    page.wait_for_url("**/lineage?target=artifact:*")
    assert page.locator("#lineage-graph g.node.execution").count() >= 1

    # Schedules: create, pause, resume, delete.
    page.goto(url + "/schedules")
    page.fill("#schedule-name", "nightly-tiny")
    page.fill("#schedule-cron", "30 2 * * *")
    page.click("#schedule-submit")
    row = page.locator("tr.schedule-row[data-name='nightly-tiny']")
    assert row.count() == 1 and "active" in row.inner_text()
    row.locator("button[data-action='pause']").click()
    assert "paused" in page.locator("tr.schedule-row[data-name='nightly-tiny']").inner_text()
    page.screenshot(path=str(shots / "schedules.png"), full_page=True)
    page.locator("tr.schedule-row[data-name='nightly-tiny'] button[data-action='resume']").click()
    assert "active" in page.locator("tr.schedule-row[data-name='nightly-tiny']").inner_text()
    page.locator("tr.schedule-row[data-name='nightly-tiny'] button[data-action='delete']").click()
    assert page.locator("tr.schedule-row[data-name='nightly-tiny']").count() == 0

    # The audit log has every write, by alice.
    page.goto(url + "/audit?user=alice")
    actions = page.eval_on_selector_all("tr.audit-row", "rows => rows.map(r => r.dataset.action)")
    for action in ("auth.login", "run.start", "schedule.create", "schedule.pause", "schedule.resume", "schedule.delete"):
        assert action in actions, actions
    assert run_id in page.inner_text("#audit-table")
    page.screenshot(path=str(shots / "audit.png"), full_page=True)
    page.close()
