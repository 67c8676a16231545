"""The dashboard over HTTP (FastAPI's TestClient against a real lineage store): pages render the
recorded runs, and the security rules hold: writes need a user, cookie writes need the CSRF
token, files outside a run's reports are 404, overrides are checked key by key, a double submit
starts one run, every write is audited.

The launcher is the one seam: RecordingLauncher checks requests exactly as the real one does
but records a pending run instead of starting a pipeline process (the browser test starts real
runs)."""

from __future__ import annotations

import html
import json
import re
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from emu.dashboard.app import create_app
from emu.dashboard.auth import hash_password, token_digest
from emu.dashboard.config import DashboardConfig
from emu.dashboard.launch import Launcher, RetrainRequest
from emu.errors import ConfigError
from emu.lineage.query import run_graph
from emu.lineage.store import LineageStore

PASSWORD = "correct horse"
TOKEN = "test-token-0123456789"
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108020000009077"
                    "53de0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082")


class RecordingLauncher(Launcher):
    """The real request checks; starting records a pending run instead of spawning `emu run`."""

    def __init__(self, config, store):
        super().__init__(config, store)
        self.started: list[tuple[str, str, list[str]]] = []

    def start(self, request, user):
        run = self.check(request)
        self.started.append((user, run.preset, run.overrides))
        return self.store.create_run(trigger="dashboard", triggered_by=user, preset=run.preset, status="pending").id


def _record_run(store: LineageStore, folder: Path, *, loss_scale: float = 1.0, stage2_steps: int = 100) -> str:
    """A finished run as the pipeline records it: executions with configs, per-step curves, a
    model and an evaluation artifact whose folder holds a report with an image."""
    run = store.create_run(trigger="cli", triggered_by="tester", preset="tiny", status="running",
                           parameters={"source": "", "source_md5": "", "code_version": "abc", "overrides": [],
                                       "configs": {"stage2": {"steps": stage2_steps, "lr": 0.001}}})
    dataset = store.record_artifact("a" * 32 + ".dir", 100, str(folder / "dataset"), "dataset", "dataset")
    for stage in ("prepare", "validate", "stage1", "precompute", "stage2", "decoder", "instruct"):
        execution = store.start_execution(run.id, stage, {"steps": 3})
        store.link(execution, dataset, "in", "data")
        if stage in ("stage1", "stage2", "instruct"):
            store.record_metric_series(run.id, execution, [
                (step, {"loss": loss_scale * (5 - step), "text_loss": loss_scale * (4 - step),
                        "image_loss": 0.5, "lr/lm": 1e-3 * step}) for step in range(1, 4)])
        if stage == "instruct":
            model = store.record_artifact(f"{len(store.list_runs()):032x}.dir", 10, str(folder / "model"), "model", "model")
            store.link(execution, model, "out", "model")
        store.finish_execution(execution, "succeeded")
    evaluation = folder / "evaluation"
    (evaluation / "report_files").mkdir(parents=True)
    (evaluation / "report_files" / "figure_1.png").write_bytes(PNG)
    (evaluation / "report.json").write_text(json.dumps({"title": "Emu evaluation", "sections": [
        {"heading": "VQAv2", "text": "", "figures": [{"file": "report_files/figure_1.png", "caption": "a <b>shape</b>"}],
         "tables": [{"caption": "", "columns": ["question", "prediction", "answer"],
                     "rows": [["What color is the circle?", "red", "red"]]}]}]}))
    (evaluation / "report.html").write_text("<html><body>report</body></html>")
    execution = store.start_execution(run.id, "evaluate", {})
    artifact = store.record_artifact("e" * 31 + str(len(store.list_runs())) + ".dir", 50, str(evaluation), "metrics",
                                     "evaluation")
    store.link(execution, artifact, "out", "evaluation")
    store.record_metrics(run.id, execution, {"vqav2_accuracy": 50.0 * loss_scale, "vqav2_chance": 33.3,
                                             "autoencode_fid": 100.0 * loss_scale})
    store.finish_execution(execution, "succeeded")
    store.update_run(run.id, status="succeeded")
    return run.id


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("EMU_HOME", str(tmp_path / "home"))
    store = LineageStore(f"sqlite:///{tmp_path / 'lineage.db'}")
    (tmp_path / "secret.txt").write_text("not for the web")
    first = _record_run(store, tmp_path / "first", stage2_steps=100)
    second = _record_run(store, tmp_path / "second", loss_scale=0.9, stage2_steps=150)
    config = DashboardConfig(users={"alice": hash_password(PASSWORD, iterations=200_000)},
                             tokens={token_digest(TOKEN): "ci-bot"}, max_failed_logins=3)
    launcher = RecordingLauncher(config, store)
    app = create_app(config, store=store, launcher=launcher, secret="test-secret")
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    return {"client": client, "store": store, "launcher": launcher, "runs": (first, second), "root": tmp_path}


def _csrf(client: TestClient, path: str = "/login") -> str:
    page = client.get(path).text
    return html.unescape(re.search(r'name="csrf_token" value="([^"]+)"', page).group(1))


def _login(client: TestClient) -> str:
    response = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": _csrf(client),
                                           "next": "/runs"}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return _csrf(client, "/retrain")  # the session's token after login


def _retrain_form(client: TestClient, csrf: str, key: str = "", **fields) -> dict:
    form = {"csrf_token": csrf, "preset": "tiny", "data": "", "overrides": "", **fields}
    if key:
        form["idempotency_key"] = key
    return form


def test_pages_render_runs_curves_images_diff_and_lineage(setup):
    client = setup["client"]
    first, second = setup["runs"]
    listing = client.get("/runs").text
    assert first in listing and second in listing and "50.000" in listing and "45.000" in listing
    page = client.get(f"/runs/{second}").text
    # Three training stages, each: loss, text loss and image loss in one chart, the LM's learning rate in another.
    assert page.count('class="series"') == 3 * (3 + 1) and page.count('<div class="chart-box">') == 3 * 2
    assert 'data-series="text_loss"' in page and 'data-series="lr/lm"' in page
    assert "What color is the circle?" in page and "a &lt;b&gt;shape&lt;/b&gt;" in page
    image = re.search(r'<img class="sample" src="([^"]+)"', page).group(1)
    served = client.get(image)
    assert served.status_code == 200 and served.content == PNG and served.headers["content-type"] == "image/png"
    assert "stage2.steps" in page and ">100<" in page and ">150<" in page, "config diff against the previous run"
    assert f'href="/runs/{first}"' in page and "-5.000" in page, "evaluation compared with the previous run"
    assert f"emu artifacts pull {second} --out DIR" in page
    assert page.count('<g class="node stage st-succeeded"') == 8 and 'data-id="register"' in page
    lineage = client.get(f"/lineage?target={second}").text
    assert 'data-id="artifact:1"' in lineage and 'href="/lineage?target=artifact:1"' in lineage
    assert client.get("/lineage?target=run-nope").status_code == 404
    assert client.get(f"/api/runs/{second}").json()["status"] == "succeeded"
    assert client.get("/runs?status=bogus").status_code == 400


def test_unauthenticated_writes_get_401_and_change_nothing(setup):
    client, store = setup["client"], setup["store"]
    store.create_schedule("nightly", "0 3 * * *", created_by="tester")
    csrf = _csrf(client)  # an anonymous session's token does not make it a user
    for path, data in (("/retrain", {"preset": "tiny"}), ("/schedules", {"name": "x", "cron": "0 1 * * *"}),
                       ("/schedules/nightly/pause", {}), ("/schedules/nightly/delete", {}),
                       (f"/runs/{setup['runs'][0]}/promote", {}), ("/logout", {})):
        response = client.post(path, data={**data, "csrf_token": csrf}, follow_redirects=False)
        assert response.status_code == 401, path
    assert client.post("/retrain", json={"preset": "tiny"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert setup["launcher"].started == []
    assert [s.name for s in store.list_schedules()] == ["nightly"] and not store.list_schedules()[0].paused
    assert store.production() is None and store.audit_entries() == []


def test_cookie_writes_need_the_csrf_token_and_same_origin(setup):
    client = setup["client"]
    assert client.post("/login", data={"username": "alice", "password": PASSWORD}).status_code == 403
    csrf = _login(client)
    for form in ({"preset": "tiny"}, {"preset": "tiny", "csrf_token": "forged"}):
        response = client.post("/retrain", data=form)
        assert response.status_code == 403 and "CSRF" in response.text
    response = client.post("/retrain", data=_retrain_form(client, csrf), headers={"Origin": "http://evil.example"})
    assert response.status_code == 403 and "cross-site" in response.text
    assert setup["launcher"].started == []
    assert client.post("/retrain", data=_retrain_form(client, csrf), follow_redirects=False).status_code == 303
    assert setup["launcher"].started == [("alice", "tiny", [])]


@pytest.mark.parametrize("how", ["json-as-form", "text/plain", "unknown-field"])
def test_a_body_the_retrain_cannot_read_is_refused_not_defaulted(setup, how):
    """`curl -d '{"preset": "small"}'` posts the JSON as a form field name; a mistyped field is as
    silent: neither may start a default tiny run."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    client = setup["client"]
    if how == "json-as-form":
        response = client.post("/retrain", content='{"preset": "small"}', headers={
            **auth, "Content-Type": "application/x-www-form-urlencoded"})
    elif how == "text/plain":
        response = client.post("/retrain", content='{"preset": "small"}', headers={**auth, "Content-Type": "text/plain"})
    else:
        response = client.post("/retrain", json={"preset": "tiny", "override": ["stage2.steps=5"]}, headers=auth)
    assert response.status_code in (415, 422), response.text
    assert setup["launcher"].started == []
    assert setup["store"].audit_entries(user="ci-bot")[0].outcome.startswith("refused:")
    if how == "unknown-field":
        assert "'override'" in response.json()["error"]


def test_api_token_writes_without_csrf(setup):
    response = setup["client"].post("/retrain", json={"preset": "tiny", "overrides": ["stage2.steps=7"]},
                                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 201, response.text
    run = setup["store"].get_run(response.json()["run_id"])
    assert (run.trigger, run.triggered_by) == ("dashboard", "ci-bot")
    assert setup["launcher"].started == [("ci-bot", "tiny", ["stage2.steps=7"])]


@pytest.mark.parametrize("path", ["../secret.txt", "..%2Fsecret.txt", "%2e%2e/%2e%2e/secret.txt",
                                  "report_files/../../secret.txt", "/etc/passwd", "", "report_files",
                                  "report%00.json"])
def test_files_outside_a_runs_reports_are_404(setup, path):
    client = setup["client"]
    first = setup["runs"][0]
    page = client.get(f"/runs/{first}").text
    artifact = re.search(r'/runs/[^/]+/files/(\d+)/report.html', page).group(1)
    assert client.get(f"/runs/{first}/files/{artifact}/report.html").status_code == 200
    assert client.get(f"/runs/{first}/files/{artifact}/{path}").status_code == 404


def test_files_of_other_runs_models_and_symlinks_are_404(setup):
    client, root = setup["client"], setup["root"]
    first, second = setup["runs"]
    page = client.get(f"/runs/{second}").text
    artifact = re.search(r'/runs/[^/]+/files/(\d+)/report.html', page).group(1)
    assert client.get(f"/runs/{first}/files/{artifact}/report.html").status_code == 404, "not this run's artifact"
    # The run's model folder exists and is recorded, but models are pulled with DVC, never served.
    (root / "second" / "model").mkdir(parents=True)
    (root / "second" / "model" / "config.json").write_text("{}")
    models = [a for a in run_graph(setup["store"], second).artifacts if a["type"] == "model"]
    assert [a["uri"] for a in models] == [str(root / "second" / "model")]
    assert client.get(f"/runs/{second}/files/{models[0]['id']}/config.json").status_code == 404
    (root / "second" / "evaluation" / "leak.txt").symlink_to(root / "secret.txt")
    assert client.get(f"/runs/{second}/files/{artifact}/leak.txt").status_code == 404


@pytest.mark.parametrize("override, named", [("stage2.stpes=3", "stage2.stpes"), ("stage2.steps=abc", "stage2.steps"),
                                             ("nosuch.key=1", "nosuch"), ("dashboard.port=1", "dashboard"),
                                             ("steps=3", "section.key=value")])
def test_unknown_or_mistyped_overrides_are_refused_naming_the_key(setup, override, named):
    client = setup["client"]
    csrf = _login(client)
    response = client.post("/retrain", data=_retrain_form(client, csrf, overrides=f"stage1.steps=5\n{override}"))
    assert response.status_code == 422
    message = html.unescape(re.search(r'id="retrain-error">([^<]+)<', response.text).group(1))
    assert named in message
    assert override in response.text, "the form keeps what was typed"
    assert setup["launcher"].started == []
    entry = setup["store"].audit_entries(action="run.start")[0]
    assert entry.user == "alice" and entry.outcome.startswith("refused:") and named in entry.outcome


def test_presets_outside_the_offered_list_are_refused(setup):
    client = setup["client"]
    csrf = _login(client)
    response = client.post("/retrain", data=_retrain_form(client, csrf, preset=str(setup["root"] / "secret.txt")))
    assert response.status_code == 422 and "is not offered" in html.unescape(response.text)
    response = client.post("/retrain", data=_retrain_form(client, csrf, data=str(setup["root"] / "nowhere")))
    assert response.status_code == 422 and "neither a shard folder" in html.unescape(response.text)


def test_retrain_data_must_lie_in_the_configured_data_roots(setup):
    root = setup["root"]
    (root / "elsewhere").mkdir()
    (root / "data" / "set").mkdir(parents=True)
    (root / "data" / "set" / "dataset.json").write_text("{}")
    client = setup["client"]
    csrf = _login(client)
    response = client.post("/retrain", data=_retrain_form(client, csrf, data=str(root / "elsewhere")))
    assert response.status_code == 422 and "outside the dashboard's data roots" in html.unescape(response.text)
    launcher = Launcher(DashboardConfig(data_roots=[str(root / "data")]), setup["store"])
    assert launcher.check(RetrainRequest(data=str(root / "data" / "set"))).source == str((root / "data" / "set").resolve())
    with pytest.raises(ConfigError, match="outside the dashboard's data roots"):
        launcher.check(RetrainRequest(data=str(root / "data" / ".." / "elsewhere")))


def test_a_double_submitted_retrain_starts_one_run(setup):
    client, store = setup["client"], setup["store"]
    csrf = _login(client)
    before = len(store.list_runs())
    form = _retrain_form(client, csrf, key="form-key-1", overrides="stage2.steps=5")
    first = client.post("/retrain", data=form, follow_redirects=False)
    second = client.post("/retrain", data=form, follow_redirects=False)
    assert first.status_code == second.status_code == 303
    assert first.headers["location"] == second.headers["location"]
    assert len(setup["launcher"].started) == 1 and len(store.list_runs()) == before + 1
    third = client.post("/retrain", data=_retrain_form(client, csrf, key="form-key-2"), follow_redirects=False)
    assert third.headers["location"] != first.headers["location"] and len(setup["launcher"].started) == 2
    outcomes = [e.outcome for e in store.audit_entries(action="run.start")]
    assert outcomes.count("ok") == 2 and sum(o.startswith("duplicate") for o in outcomes) == 1


class SlowLauncher(RecordingLauncher):
    """Starting a run takes until the test says so (a KFP submission, a slow disk)."""

    def __init__(self, config, store):
        super().__init__(config, store)
        self.entered, self.release = threading.Event(), threading.Event()

    def start(self, request, user):
        self.entered.set()
        assert self.release.wait(20), "the test never released the start"
        return super().start(request, user)


def test_a_double_submit_while_the_first_is_starting_shows_the_same_run(setup):
    """The second of a double click arrives while the first is still starting its run: it waits
    for that run instead of starting another or failing, and the server keeps answering meanwhile."""
    store = setup["store"]
    config = DashboardConfig(users={"alice": hash_password(PASSWORD, iterations=200_000)})
    launcher = SlowLauncher(config, store)
    app = create_app(config, store=store, launcher=launcher, secret="test-secret")
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:  # one event loop, as under uvicorn
        form = _retrain_form(client, _login(client), key="double-click")
        answers = []

        def submit():
            answers.append(client.post("/retrain", data=form, follow_redirects=False))

        first = threading.Thread(target=submit)
        first.start()
        assert launcher.entered.wait(20)
        began = time.monotonic()
        assert client.get("/healthz").status_code == 200
        assert time.monotonic() - began < 5, "a run being started must not stall the server"
        second = threading.Thread(target=submit)
        second.start()
        time.sleep(1.0)  # the second request is waiting on the key now
        launcher.release.set()
        first.join(30)
        second.join(30)
    assert [a.status_code for a in answers] == [303, 303], [a.text[:300] for a in answers]
    assert answers[0].headers["location"] == answers[1].headers["location"]
    assert len(launcher.started) == 1


def test_a_logged_in_users_refused_write_is_audited(setup):
    client, store = setup["client"], setup["store"]
    _login(client)
    assert client.post("/retrain", data={"preset": "tiny", "csrf_token": "forged"}).status_code == 403
    schedule = store.create_schedule("nightly", "0 3 * * *", created_by="tester")
    assert client.post(f"/schedules/{schedule.id}/delete", data={}, headers={"Origin": "http://evil.example"}
                       ).status_code == 403
    entries = {e.action: e for e in store.audit_entries(user="alice")}
    assert entries["run.start"].outcome.startswith("denied: CSRF")
    assert entries["schedule.delete"].outcome.startswith("denied: cross-site")
    assert entries["schedule.delete"].target == schedule.id and store.get_schedule(schedule.id) is not None
    assert "forged" not in json.dumps(entries["run.start"].request), "the sent token is redacted"


def test_a_run_not_started_yet_has_no_config_diff(setup):
    """A retrain is recorded (pending) before `emu run` resolves its configs: no diff against the
    previous run's (every setting would read as removed), and the page says so."""
    store = setup["store"]
    pending = store.create_run(trigger="dashboard", triggered_by="alice", preset="tiny", status="pending",
                               parameters={"source": "", "overrides": ["stage2.steps=5"]})
    page = setup["client"].get(f"/runs/{pending.id}").text
    assert "(absent)" not in page and 'id="config-diff"' not in page and 'id="config-unresolved"' in page
    assert "No stage has started yet." in page and "stage2.steps=5" in page
    # A run recorded under an id that is no file name (EMU_RUN_ID set by hand) has no console log.
    odd = store.create_run(run_id="ad hoc:1", status="running").id
    assert setup["client"].get(f"/runs/{odd}").status_code == 200


def test_a_validation_report_links_to_the_file_it_has(setup):
    """The validation's report folder has report.json, no report.html: its link opens what exists."""
    store, root = setup["store"], setup["root"]
    first = setup["runs"][0]
    folder = root / "validation"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"passed": False}))
    execution = store.start_execution(first, "validate", {})
    artifact = store.record_artifact("b" * 32 + ".dir", 20, str(folder), "report", "validation")
    store.link(execution, artifact, "out", "validation")
    store.finish_execution(execution, "failed", error="the data failed validation")
    client = setup["client"]
    page = client.get(f"/runs/{first}").text
    assert f'href="/runs/{first}/files/{artifact}/report.json"' in page
    assert f"/files/{artifact}/report.html" not in page
    assert client.get(f"/runs/{first}/files/{artifact}/report.json").json() == {"passed": False}


class _Exited:
    """A finished `emu run` process as the launcher's watcher sees it."""

    def __init__(self, code):
        self.code = code

    def wait(self):
        return self.code


@pytest.mark.parametrize("code", [1, -9, 0])
def test_a_run_whose_process_ended_without_an_outcome_is_marked_failed(setup, code):
    store = setup["store"]
    launcher = Launcher(DashboardConfig(), store)
    run = store.create_run(trigger="dashboard", triggered_by="alice", status="pending").id
    from emu.pipeline.runner import run_log_path

    run_log_path(run).parent.mkdir(parents=True, exist_ok=True)
    run_log_path(run).write_text("starting\nTraceback ...\nImportError: no module named x\n")
    launcher._watch(run, _Exited(code))
    failed = store.get_run(run)
    assert failed.status == "failed" and f"exited with code {code}" in failed.error and "ImportError" in failed.error
    done = store.create_run(status="running").id
    store.update_run(done, status="succeeded")
    launcher._watch(done, _Exited(0))
    assert store.get_run(done).status == "succeeded" and store.get_run(done).error is None


def test_a_run_that_could_not_be_launched_is_not_left_pending(setup, monkeypatch):
    import emu.dashboard.launch as launch

    def broken(*args, **kwargs):
        raise OSError("no python here")

    monkeypatch.setattr(launch, "launch_background", broken)
    store = setup["store"]
    before = {r.id for r in store.list_runs()}
    with pytest.raises(OSError):
        Launcher(DashboardConfig(), store).start(launch.RetrainRequest(preset="tiny"), "alice")
    (new,) = [r for r in store.list_runs() if r.id not in before]
    assert new.status == "failed" and "no python here" in new.error


def test_schedules_create_pause_resume_delete_and_audit(setup):
    client, store = setup["client"], setup["store"]
    csrf = _login(client)
    bad = client.post("/schedules", data={"csrf_token": csrf, "name": "n", "cron": "61 * * * *", "preset": "tiny"})
    assert bad.status_code == 422 and "minute" in html.unescape(bad.text).lower()
    ok = client.post("/schedules", data={"csrf_token": csrf, "name": "nightly", "cron": "0 3 * * *", "preset": "tiny",
                                         "overrides": "stage2.steps=9"}, follow_redirects=False)
    assert ok.status_code == 303
    schedule = store.get_schedule("nightly")
    assert schedule.created_by == "alice" and schedule.parameters["overrides"] == ["stage2.steps=9"]
    for action, paused in (("pause", True), ("resume", False)):
        assert client.post(f"/schedules/{schedule.id}/{action}", data={"csrf_token": csrf},
                           follow_redirects=False).status_code == 303
        assert store.get_schedule(schedule.id).paused is paused
    assert client.post(f"/schedules/{schedule.id}/delete", data={"csrf_token": csrf},
                       follow_redirects=False).status_code == 303
    assert store.get_schedule(schedule.id) is None
    assert client.post(f"/schedules/{schedule.id}/delete", data={"csrf_token": csrf}).status_code == 404
    actions = [e.action for e in store.audit_entries(user="alice")]
    for action in ("schedule.create", "schedule.pause", "schedule.resume", "schedule.delete", "auth.login"):
        assert action in actions
    audit_page = client.get("/audit").text
    requests = " ".join(re.findall(r'<code class="request">(.*?)</code>', audit_page))
    assert "schedule.delete" in audit_page and "stage2.steps=9" in requests
    assert csrf not in requests and PASSWORD not in requests and "[redacted]" in requests


def test_promotion_is_an_audited_confirmed_write(setup):
    client, store = setup["client"], setup["store"]
    csrf = _login(client)
    second = setup["runs"][1]
    assert 'id="promote-confirm"' in client.get(f"/runs/{second}").text
    unconfirmed = client.post(f"/runs/{second}/promote", data={"csrf_token": csrf})
    assert unconfirmed.status_code == 409 and "not confirmed" in unconfirmed.text and store.production() is None
    assert client.post(f"/runs/{second}/promote", data={"csrf_token": csrf, "confirm": "yes"},
                       follow_redirects=False).status_code == 303
    production = store.production()
    assert production.run_id == second and production.metrics["vqav2_accuracy"] == pytest.approx(45.0)
    assert store.audit_entries(action="model.promote")[0].outcome == "ok: v1"
    # The production run is not offered again, and its md5 is never registered twice.
    page = client.get(f"/runs/{second}").text
    assert 'id="promote"' not in page and "This run&#39;s model is the production model (v1)." in page
    again = client.post(f"/runs/{second}/promote", data={"csrf_token": csrf, "confirm": "yes"})
    assert again.status_code == 409 and [r.version for r in store.registrations()] == ["v1"]
    pending = store.create_run(status="running").id
    assert client.post(f"/runs/{pending}/promote", data={"csrf_token": csrf, "confirm": "yes"}).status_code == 409
    assert client.post("/runs/run-nope/promote", data={"csrf_token": csrf, "confirm": "yes"}).status_code == 404
    outcomes = [(e.target, e.outcome) for e in store.audit_entries(action="model.promote")]
    assert (second, "refused: promotion not confirmed: tick the confirmation box (confirm=yes) to replace the "
                    "production model") in outcomes
    assert any(t == second and o.startswith(f"refused: run {second}: This run's model is the production model")
               for t, o in outcomes)
    assert dict(outcomes)[pending].startswith("refused:") and dict(outcomes)["run-nope"].startswith("refused: no run")


def test_a_gate_failed_run_is_offered_with_its_verdict_and_a_warning(setup):
    """The gate's verdict per metric (gate.json of the evaluation), and a promote form that says
    the gate failed."""
    client, store, root = setup["client"], setup["store"], setup["root"]
    first, second = setup["runs"]
    evaluate = next(e for e in store.list_executions(second) if e.stage == "evaluate")
    store.record_metrics(second, evaluate.id, {"gate_passed": 0.0})
    (root / "second" / "evaluation" / "gate.json").write_text(json.dumps({
        "passed": False, "against": "production v1 (run run-x)", "reasons": ["vqav2_accuracy ..."], "checks": [
            {"metric": "vqav2_accuracy", "passed": False, "value": 45.0, "reference": "production v1",
             "threshold": 50.0, "direction": "higher", "tolerance": 0.5, "bound": 49.5, "strict": False,
             "message": "vqav2_accuracy = 45; needs >= 49.5"},
            {"metric": "autoencode_fid", "passed": True, "value": 90.0, "reference": "production v1",
             "threshold": 100.0, "direction": "lower", "tolerance": 0.5, "bound": 100.5, "strict": False,
             "message": "autoencode_fid = 90; needs <= 100.5"}]}))
    csrf = _login(client)
    page = client.get(f"/runs/{second}").text
    assert "against production v1 (run run-x)" in page
    rows = re.findall(r"<tr class=\"(ok|fail)\"><td>([a-z0-9_]+)</td><td class=\"num\">([0-9.]+)</td><td>([^<]+)</td>"
                      r"\s*<td class=\"num\">([0-9.]+)</td><td class=\"num\">([0-9.]+)</td>", page)
    assert rows == [("fail", "vqav2_accuracy", "45.000", "production v1", "50.000", "0.500"),
                    ("ok", "autoencode_fid", "90.000", "production v1", "100.000", "0.500")]
    assert "&gt;= 49.500 (higher is better)" in page and "&lt;= 100.500 (lower is better)" in page
    assert 'id="promote-warning"' in page and "although its gate failed" in page
    assert client.post(f"/runs/{second}/promote", data={"csrf_token": csrf, "confirm": "yes"},
                       follow_redirects=False).status_code == 303


def test_changes_are_coloured_by_the_metrics_direction(setup):
    """Run two has lower VQA accuracy (worse) and lower FID (better): red and green."""
    page = setup["client"].get(f"/runs/{setup['runs'][1]}").text
    cells = dict(re.findall(r"<tr><td>([a-z0-9_]+)</td>.*?<td class=\"num ?(up|down|)\" title", page, re.S))
    assert cells == {"autoencode_fid": "up", "vqav2_accuracy": "down", "vqav2_chance": ""}


def test_login_is_throttled(setup):
    client = setup["client"]
    for _ in range(3):
        assert client.post("/login", data={"username": "alice", "password": "wrong",
                                           "csrf_token": _csrf(client)}).status_code == 401
    blocked = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": _csrf(client)})
    assert blocked.status_code == 429
    # Failed logins are in the audit log, under the name tried; the passwords are not.
    entries = setup["store"].audit_entries(action="auth.login")
    assert [(e.user, e.outcome) for e in reversed(entries)] == [
        ("alice", "denied: wrong user name or password")] * 3 + [("alice", "denied: too many failed logins")]
    assert PASSWORD not in json.dumps([e.request for e in entries]) and "wrong" not in json.dumps(
        [e.request for e in entries])


def test_50_parallel_wrong_logins_are_refused_after_the_limit_and_the_user_still_gets_in(setup):
    """The throttle counts each attempt before its password check (max_failed_logins=3): of 50
    concurrent guesses from one address only 3 are checked; the real user, from another address,
    logs in right after."""
    from concurrent.futures import ThreadPoolExecutor

    app = setup["client"].app
    guessers = [TestClient(app, base_url="http://127.0.0.1:8000", client=("10.6.6.6", 40000 + i)) for i in range(50)]
    tokens = [_csrf(client) for client in guessers]
    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(lambda pair: pair[0].post("/login", data={
            "username": "alice", "password": "guess", "csrf_token": pair[1]}).status_code, zip(guessers, tokens)))
    assert sorted(codes) == [401] * 3 + [429] * 47
    assert guessers[0].post("/login", data={"username": "alice", "password": PASSWORD,
                                            "csrf_token": tokens[0]}).status_code == 429, "the guesser stays locked"
    user = TestClient(app, base_url="http://127.0.0.1:8000", client=("10.1.1.1", 50000))
    response = user.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": _csrf(user)},
                         follow_redirects=False)
    assert response.status_code == 303


def test_logout_revokes_the_session(setup):
    client = setup["client"]
    csrf = _login(client)
    cookie = client.cookies.get("emu_session")
    assert client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    replay = TestClient(client.app, base_url="http://127.0.0.1:8000", cookies={"emu_session": cookie})
    assert replay.post("/retrain", data=_retrain_form(replay, csrf)).status_code == 401


def test_production_mode_needs_users_and_logins_for_reads(setup):
    with pytest.raises(ConfigError, match="no default credentials"):
        create_app(DashboardConfig(production=True), store=setup["store"])
    app = create_app(DashboardConfig(production=True, users={"alice": hash_password(PASSWORD, iterations=200_000)}),
                     store=setup["store"], secret="s")
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    response = client.get("/runs", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/login")
    assert client.get(f"/api/runs/{setup['runs'][0]}").status_code == 401
    _login(client)
    assert client.get("/runs").status_code == 200


def test_stage_edges_match_the_compiled_pipeline():
    import yaml

    from emu.pipeline.runner import TASK_EDGES, TASKS

    spec = next(yaml.safe_load_all((Path(__file__).parents[2] / "pipelines" / "emu_pipeline.yaml").read_text()))
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]  # the graph inside the exit handler
    depends = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    for condition in [name for name in tasks if name.startswith("condition-")]:  # the gate's dsl.If
        inner = tasks[condition]["componentRef"]["name"]
        for name, task in spec["components"][inner]["dag"]["tasks"].items():
            depends[name] = set(task.get("dependentTasks", [])) | depends[condition]
    for source, target in TASK_EDGES:
        assert source in depends[target], f"{source} -> {target} is not an edge of the compiled pipeline"
    assert {s for edge in TASK_EDGES for s in edge} == set(TASKS)


class _KfpRuns:
    """Stands in for kfp.Client's run API (no KFP cluster can run here): the states a cluster reports."""

    def __init__(self, states):
        self.states, self.calls = list(states), 0

    def get_run(self, run_id):
        self.calls += 1
        state = self.states.pop(0)
        if isinstance(state, Exception):
            raise state
        return type("Run", (), {"state": state})()


def test_a_cluster_run_shows_the_state_kfp_reports(setup, monkeypatch):
    import emu.dashboard.launch as launch

    store = setup["store"]
    monkeypatch.setattr(launch, "KFP_POLL_S", 0.0)
    launcher = Launcher(DashboardConfig(backend="kfp", kfp_host="http://kfp.example:8888"), store)
    launcher._kfp_client = _KfpRuns([ConnectionError("cluster away"), "RUNNING", "FAILED"])
    client = TestClient(create_app(DashboardConfig(), store=store, launcher=launcher, secret="s"),
                        base_url="http://127.0.0.1:8000")
    run = store.create_run(trigger="dashboard", triggered_by="alice", backend="kfp", kfp_run_id="kfp-9",
                           status="running")
    assert client.get(f"/api/runs/{run.id}").json()["status"] == "running", "an unreachable API changes nothing"
    assert client.get(f"/api/runs/{run.id}").json()["status"] == "running"
    ended = client.get(f"/api/runs/{run.id}").json()
    assert ended["status"] == "failed" and "kfp-9 ended FAILED" in ended["error"]
    assert client.get(f"/api/runs/{run.id}").json()["status"] == "failed" and launcher._kfp_client.calls == 3
