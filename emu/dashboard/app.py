"""The dashboard web app (FastAPI, server-rendered HTML and SVG, no JavaScript, nothing from a CDN).

Pages: runs (filters), a run (stage graph with live status, loss and learning-rate curves per
stage, evaluation against the previous run and production, example answers, generated images and
reconstructions, resolved config and its diff, artifacts with md5 and restore command, console
log), lineage (any run or artifact, navigable), retrain, schedules, audit log, login.

Security model (see emu.dashboard.auth for the primitives):
- Reads: open on loopback outside production mode, else login required (DashboardConfig.read_access).
- Writes (retrain, schedule changes, promotion, logout) need an authenticated user: a session
  cookie from /login, or `Authorization: Bearer <token>` for API clients. Cookie-authenticated
  writes also need the session's CSRF token (form field `csrf_token` or header `X-CSRF-Token`),
  and a cross-site Origin is refused. 401 without a user, 403 for a bad CSRF token or origin.
- Every authenticated write is appended to the audit log with the user, the time, the request
  (secrets redacted) and the outcome, refusals included (a bad CSRF token or a cross-site origin
  on a logged-in user's request is recorded as `denied: ...`).
- Files are served only from the report/metrics artifacts a run recorded, resolved inside the
  artifact's folder: anything else (traversal, other runs' artifacts, models) is 404.
- A retrain carries an idempotency key: a double submit starts one run (a repeat that arrives
  while the first is still starting its run waits for it, then shows the same run).

Slow work (password hashing, checking and starting a run, a KFP submission) runs in the thread
pool, never on the event loop, so that one request never stalls every page.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from emu.dashboard import views
from emu.dashboard.auth import LoginThrottle, Session, SessionSigner, sanitize, token_digest, verify_password
from emu.dashboard.config import SECRET_ENV, DashboardConfig
from emu.dashboard.launch import Launcher, RetrainRequest, log_tail, offered_presets, parse_overrides
from emu.errors import ConfigError, EmuError
from emu.lineage import LineageError
from emu.lineage.models import RUN_STATUSES, TRIGGERS
from emu.lineage.store import LineageStore
from emu.pipeline.runstate import cancel_quietly, reconcile_quietly

log = logging.getLogger(__name__)

__all__ = ["create_app", "COOKIE"]

HERE = Path(__file__).resolve().parent
COOKIE = "emu_session"
#: Pages of active runs reload themselves this often (seconds): live status without JavaScript.
REFRESH_SECONDS = 3
#: Seconds between two checks for runs whose `emu run` is gone (emu.pipeline.runstate): a page
#: of such a run would otherwise say running, and reload, for ever.
RECONCILE_SECONDS = 5.0
#: Content-Security-Policy of the app's pages: only its own stylesheet and images, no scripts.
PAGE_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
#: Served artifact files (e.g. the self-contained HTML report with its inline styles) run sandboxed.
FILE_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; sandbox"
#: How long a repeated retrain request waits for the request that first used its idempotency key
#: to start its run (a double click: the second arrives while the first is still starting).
IDEMPOTENCY_WAIT_S = 30.0
#: The fields a retrain and a new schedule take (besides the form's csrf_token).
RETRAIN_FIELDS = ("preset", "data", "overrides", "idempotency_key")
SCHEDULE_FIELDS = ("name", "cron", "preset", "data", "overrides")


class _Denied(Exception):
    """A write refused before it ran: 401 (no user) or 403 (CSRF, origin)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def create_app(config: DashboardConfig, *, store: LineageStore | None = None, launcher: Launcher | None = None,
               secret: str | None = None) -> FastAPI:
    """The app. `store` defaults to the lineage store of EMU_LINEAGE_URL (else $EMU_HOME's SQLite);
    `launcher` to one starting runs on `config.backend`; `secret` (signs cookies) to
    EMU_DASHBOARD_SECRET, else a random one (sessions then end when the process does)."""
    if config.production and not (config.users or config.tokens):
        raise ConfigError("dashboard.production is set but no users or tokens are configured "
                          "(EMU_DASHBOARD_USERS / EMU_DASHBOARD_TOKENS): production mode has no default credentials")
    if store is None:
        from emu.pipeline.runner import emu_home

        emu_home().mkdir(parents=True, exist_ok=True)
        store = LineageStore()  # EMU_LINEAGE_URL, else $EMU_HOME/lineage.db: where `emu run` records
    launcher = launcher or Launcher(config, store)
    reconciled = [-RECONCILE_SECONDS]

    def reconcile_runs() -> None:
        now = time.monotonic()
        if now - reconciled[0] >= RECONCILE_SECONDS:
            reconciled[0] = now
            reconcile_quietly(store)
    signer = SessionSigner(secret or os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32))
    throttle = LoginThrottle(config.max_failed_logins)
    lifetime = timedelta(hours=config.session_hours).total_seconds()

    app = FastAPI(title="Emu dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["when"] = _when
    templates.env.filters["num"] = _num
    templates.env.filters["size"] = _size

    # ------------------------------------------------------------------ sessions and identity

    @app.middleware("http")
    async def session_middleware(request: Request, call_next):
        session = signer.loads(request.cookies.get(COOKIE))
        fresh = session is None
        if fresh:
            session = Session.new(None, lifetime)
        request.state.session = session
        request.state.set_session = None
        response = await call_next(request)
        chosen = request.state.set_session
        if chosen is not None or fresh:
            _set_cookie(response, signer.dumps(chosen or session), config)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    def bearer_user(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        digest = token_digest(header[7:].strip())
        for known, user in config.tokens.items():
            if hmac.compare_digest(known, digest):
                return user
        return None

    def user_of(request: Request) -> str | None:
        """The authenticated user: a valid bearer token, else a logged-in session whose user still exists."""
        user = bearer_user(request)
        if user is not None:
            return user
        session: Session = request.state.session
        return session.user if session.user is not None and session.user in config.users else None

    def check_read(request: Request) -> None:
        if config.reads_need_login and user_of(request) is None:
            raise HTTPException(401, "log in to see this page")

    async def writer(request: Request, action: str, target: str | None = None) -> tuple[str, dict[str, Any]]:
        """(user, form fields) of a write request, or _Denied. A logged-in user's request refused
        for its CSRF token or origin is audited as `action` (a forged request made through that
        user's browser is exactly what the log must show)."""
        form = dict(await request.form()) if _is_form(request) else {}
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        user = user_of(request)
        if user is None:
            raise _Denied(401, "authentication required: log in, or send Authorization: Bearer <token>")
        if bearer_user(request) is None:  # cookie-authenticated: a browser, so CSRF and origin checks
            origin = request.headers.get("origin")
            sent = str(form.get("csrf_token") or request.headers.get("x-csrf-token") or "")
            refusal = None
            if origin and origin != "null" and urlsplit(origin).netloc != request.url.netloc:
                refusal = f"cross-site request from {origin[:200]} refused"
            elif not _same_token(sent, request.state.session.csrf):
                refusal = "CSRF token missing or wrong: reload the page and submit again"
            if refusal is not None:
                audit(user, action, target, request, fields, f"denied: {refusal}")
                raise _Denied(403, refusal)
        return user, fields

    def audit(user: str, action: str, target: str | None, request: Request, fields: dict[str, Any],
              outcome: str) -> None:
        # A target may come from the URL (a run or schedule id that need not exist); the column holds 255.
        entry = {"method": request.method, "path": request.url.path,
                 "client": request.client.host if request.client else None, "fields": fields}
        store.audit(user, action, target[:255] if target else None, sanitize(entry), outcome)

    async def body_of(request: Request, user: str, action: str, fields: dict[str, Any],
                      takes: tuple[str, ...]) -> dict[str, Any]:
        """A write's fields (the form's, else a JSON object), refused and audited when unreadable
        or naming a field `action` does not take: JSON posted as a form, or a mistyped field, must
        not start a run with the defaults."""
        try:
            body = fields or await _json_body(request)
            unknown = sorted(set(body) - set(takes) - {"csrf_token"})
            if unknown:
                raise HTTPException(422, f"unknown field {unknown[0][:100]!r}: this takes {', '.join(takes)} "
                                         f"(a JSON body needs Content-Type: application/json)")
        except HTTPException as exc:
            audit(user, action, None, request, fields, f"refused: {exc.detail}")
            raise
        return body

    def page(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        session: Session = request.state.session
        return templates.TemplateResponse(request, name, {
            "user": user_of(request), "csrf": session.csrf, "backend": config.backend,
            "can_write": bool(config.users or config.tokens), **context}, status_code=code)

    def denied(request: Request, exc: _Denied) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return page(request, "error.html", exc.status, title="Not allowed", message=exc.message,
                    login=exc.status == 401)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 401 and not _wants_json(request) and request.method == "GET":
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        if _wants_json(request):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        return page(request, "error.html", exc.status_code, title=f"{exc.status_code}", message=str(exc.detail),
                    login=False)

    # ------------------------------------------------------------------ login

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/runs"):
        return page(request, "login.html", next=_safe_next(next), error=None)

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        target = _safe_next(str(form.get("next", "/runs")))
        sent = str(form.get("csrf_token", ""))
        if not _same_token(sent, request.state.session.csrf):
            return page(request, "login.html", 403, next=target, error="CSRF token missing or wrong: reload the page")
        # Failed logins are audited under the name tried (who tried to log in as whom is what a
        # reader of the audit log looks for); the password never is.
        client = request.client.host if request.client else "?"
        if not throttle.acquire(client, name):  # counted before the password is checked
            audit(name[:255] or "-", "auth.login", None, request, {"username": name}, "denied: too many failed logins")
            return page(request, "login.html", 429, next=target, error="too many failed logins; try again later")
        if not await run_in_threadpool(verify_password, password, config.users.get(name)):
            log.warning("failed dashboard login for %r from %s", name, request.client.host if request.client else "?")
            audit(name[:255] or "-", "auth.login", None, request, {"username": name},
                  "denied: wrong user name or password")
            return page(request, "login.html", 401, next=target, error="wrong user name or password")
        throttle.succeeded(client, name)
        signer.revoke(request.state.session)  # a new session id and CSRF token at privilege change
        request.state.set_session = Session.new(name, lifetime)
        audit(name, "auth.login", None, request, {"username": name}, "ok")
        return RedirectResponse(target, status_code=303)

    @app.post("/logout")
    async def logout(request: Request):
        try:
            user, _ = await writer(request, "auth.logout")
        except _Denied as exc:
            return denied(request, exc)
        signer.revoke(request.state.session)
        request.state.set_session = Session.new(None, lifetime)
        audit(user, "auth.logout", None, request, {}, "ok")
        return RedirectResponse("/runs", status_code=303)

    # ------------------------------------------------------------------ runs

    @app.get("/")
    def home():
        return RedirectResponse("/runs", status_code=303)

    @app.get("/runs", response_class=HTMLResponse)
    def runs(request: Request, status: str = "", trigger: str = "", limit: int = 50):
        check_read(request)
        if status and status not in RUN_STATUSES:
            raise HTTPException(400, f"status must be one of {', '.join(RUN_STATUSES)}")
        if trigger and trigger not in TRIGGERS:
            raise HTTPException(400, f"trigger must be one of {', '.join(TRIGGERS)}")
        reconcile_runs()
        found = store.list_runs(status=status or None, trigger=trigger or None, limit=max(1, min(limit, 500)))
        rows = [views.run_row(store, r) for r in found]
        active = any(r["status"] in ("pending", "running") for r in rows)
        return page(request, "runs.html", rows=rows, status=status, trigger=trigger, statuses=RUN_STATUSES,
                    triggers=TRIGGERS, headline=views.HEADLINE_METRICS, refresh=REFRESH_SECONDS if active else None,
                    production=store.production())

    def run_or_404(run_id: str):
        reconcile_runs()
        run = store.get_run(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id!r}")
        if run.backend == "kfp":  # a cluster run's end is known to KFP only
            launcher.refresh_kfp_status(run)
            run = store.get_run(run_id)
        return run

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str):
        check_read(request)
        run = run_or_404(run_id)
        executions = store.list_executions(run.id)
        previous = views.previous_run(store, run)
        active = run.status in ("pending", "running")
        return page(request, "run.html", run=run, refresh=REFRESH_SECONDS if active else None,
                    row=views.run_row(store, run), graph=views.stage_graph(executions, run.status),
                    executions=executions, curves=views.curves(store, executions),
                    evaluation=views.evaluation_table(store, executions, previous),
                    gate=views.gate(store, run, executions), promotion=views.promotion(store, run, executions),
                    report=views.report(store, run, executions), config=views.config_diff(run, previous),
                    artifacts=views.artifacts(store, run, executions), log=log_tail(run.id),
                    duration=views.duration_text)

    @app.get("/api/runs/{run_id}")
    def run_json(request: Request, run_id: str):
        check_read(request)
        run = run_or_404(run_id)
        row = views.run_row(store, run)
        return {"id": run.id, "status": run.status, "trigger": run.trigger, "triggered_by": run.triggered_by,
                "error": run.error, "stages": row["stages"], "metrics": row["metrics"]}

    @app.get("/runs/{run_id}/files/{artifact_id}/{path:path}")
    def run_file(request: Request, run_id: str, artifact_id: str, path: str):
        check_read(request)
        found = views.run_file(store, run_id, int(artifact_id), path) if artifact_id.isdigit() else None
        if found is None:
            raise HTTPException(404, "no such file in this run's reports")
        response = FileResponse(found)
        response.headers["Content-Security-Policy"] = FILE_CSP
        return response

    @app.post("/runs/{run_id}/cancel")
    async def cancel_run(request: Request, run_id: str):
        """Stop a local run and its tasks (emu.pipeline.runstate.cancel, in the background: a
        training stage may take a step to checkpoint); the page then shows it cancelled."""
        try:
            user, fields = await writer(request, "run.cancel", run_id)
        except _Denied as exc:
            return denied(request, exc)
        run = run_or_404(run_id)
        refusal = (f"run {run_id} has ended ({run.status})" if run.status not in ("pending", "running") else
                   f"run {run_id} runs on a KFP cluster; cancel it there" if run.backend != "local" else None)
        if refusal is not None:
            audit(user, "run.cancel", run_id, request, fields, f"refused: {refusal}")
            raise HTTPException(409, refusal)
        threading.Thread(target=cancel_quietly, args=(store, run_id, user), daemon=True,
                         name=f"cancel-{run_id}").start()
        audit(user, "run.cancel", run_id, request, fields, "ok")
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    @app.post("/runs/{run_id}/promote")
    async def promote(request: Request, run_id: str):
        try:
            user, fields = await writer(request, "model.promote", run_id)
        except _Denied as exc:
            return denied(request, exc)
        try:
            version = _promote(store, run_or_404(run_id), confirmed=fields.get("confirm") == "yes")
        except HTTPException as exc:
            audit(user, "model.promote", run_id, request, fields, f"refused: {exc.detail}")
            raise
        except EmuError as exc:
            audit(user, "model.promote", run_id, request, fields, f"refused: {exc}")
            raise HTTPException(409, str(exc)) from None
        audit(user, "model.promote", run_id, request, fields, f"ok: {version}")
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    # ------------------------------------------------------------------ lineage

    @app.get("/lineage", response_class=HTMLResponse)
    def lineage(request: Request, target: str = "", direction: str = "up"):
        check_read(request)
        from emu.lineage.query import show

        if direction not in ("up", "down"):
            raise HTTPException(400, "direction must be up or down")
        graph, drawing, error = None, None, None
        if target:
            try:
                graph = show(store, target, direction)
                drawing = views.lineage_svg(graph)
            except (LineageError, EmuError) as exc:
                error = str(exc)
        return page(request, "lineage.html", 404 if error else 200, target=target, direction=direction,
                    graph=graph, drawing=drawing, error=error,
                    registrations=store.registrations()[:20], recent=store.list_runs(limit=10))

    # ------------------------------------------------------------------ retrain

    def retrain_page(request: Request, code: int = 200, error: str | None = None, values: dict | None = None):
        values = values or {"preset": "tiny", "data": "", "overrides": ""}
        return page(request, "retrain.html", code, presets=list(offered_presets(config)), error=error,
                    values=values, idempotency_key=uuid.uuid4().hex)

    @app.get("/retrain", response_class=HTMLResponse)
    def retrain_form(request: Request):
        if user_of(request) is None:
            return RedirectResponse("/login?next=/retrain", status_code=303)
        return retrain_page(request)

    async def claim(key: str, user: str) -> tuple[bool, str | None]:
        """Claim a retrain's idempotency key; a key whose first request is still starting its run
        is waited for (up to IDEMPOTENCY_WAIT_S) so that a double click shows that run."""
        deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
        while True:
            claimed, earlier = store.claim_idempotency_key(key, user, "run.start")
            if claimed or earlier is not None or time.monotonic() >= deadline:
                return claimed, earlier
            await asyncio.sleep(0.25)

    @app.post("/retrain")
    async def retrain(request: Request):
        try:
            user, fields = await writer(request, "run.start")
        except _Denied as exc:
            return denied(request, exc)
        body = await body_of(request, user, "run.start", fields, RETRAIN_FIELDS)
        wanted = _retrain_request(body)
        key = str(body.get("idempotency_key") or request.headers.get("idempotency-key") or "")
        try:
            await run_in_threadpool(launcher.check, wanted)
        except (ConfigError, EmuError) as exc:
            audit(user, "run.start", None, request, fields or body, f"refused: {exc}")
            if _wants_json(request):
                return JSONResponse({"error": str(exc)}, status_code=422)
            return retrain_page(request, 422, str(exc), {**body, "overrides": "\n".join(wanted.overrides)})
        if key:
            try:
                claimed, earlier = await claim(key, user)
            except LineageError as exc:
                audit(user, "run.start", None, request, fields or body, f"refused: {exc}")
                raise HTTPException(400, str(exc)) from None
            if not claimed:
                audit(user, "run.start", earlier, request, fields or body, "duplicate: idempotency key already used")
                if earlier is None:
                    raise HTTPException(409, "this retrain request is still being started; see the runs list")
                return _started(request, earlier, duplicate=True)
        try:
            run_id = await run_in_threadpool(launcher.start, wanted, user)
        except Exception as exc:
            if key:
                store.release_idempotency_key(key, user, "run.start")
            audit(user, "run.start", None, request, fields or body, f"error: {type(exc).__name__}: {exc}")
            raise HTTPException(500, f"could not start the run: {exc}") from None
        if key:
            store.complete_idempotency_key(key, user, "run.start", run_id)
        audit(user, "run.start", run_id, request, fields or body, "ok")
        return _started(request, run_id, duplicate=False)

    # ------------------------------------------------------------------ schedules

    @app.get("/schedules", response_class=HTMLResponse)
    def schedules(request: Request):
        check_read(request)
        return schedules_page(request)

    def schedules_page(request: Request, code: int = 200, error: str | None = None, values: dict | None = None):
        rows = []
        for s in store.list_schedules():
            last = store.get_run(s.last_run_id) if s.last_run_id else None
            rows.append({"schedule": s, "last": last})
        return page(request, "schedules.html", code, rows=rows, error=error, presets=list(offered_presets(config)),
                    values=values or {"name": "", "cron": "0 3 * * *", "preset": "tiny", "data": "", "overrides": ""})

    @app.post("/schedules")
    async def create_schedule(request: Request):
        try:
            user, fields = await writer(request, "schedule.create")
        except _Denied as exc:
            return denied(request, exc)
        body = await body_of(request, user, "schedule.create", fields, SCHEDULE_FIELDS)
        wanted = _retrain_request(body)
        try:
            run = await run_in_threadpool(launcher.check, wanted)
            schedule = store.create_schedule(str(body.get("name") or ""), str(body.get("cron") or ""),
                                             parameters={"preset": run.preset, "data": run.source,
                                                         "overrides": run.overrides},
                                             created_by=user, preset=run.preset)
        except (ConfigError, EmuError, LineageError) as exc:
            audit(user, "schedule.create", None, request, fields or body, f"refused: {exc}")
            if _wants_json(request):
                return JSONResponse({"error": str(exc)}, status_code=422)
            return schedules_page(request, 422, str(exc), {**body, "overrides": "\n".join(wanted.overrides)})
        audit(user, "schedule.create", schedule.id, request, fields or body, "ok")
        if _wants_json(request):
            return JSONResponse({"id": schedule.id, "name": schedule.name}, status_code=201)
        return RedirectResponse("/schedules", status_code=303)

    @app.post("/schedules/{schedule_id}/{action}")
    async def change_schedule(request: Request, schedule_id: str, action: str):
        if action not in ("pause", "resume", "delete"):
            raise HTTPException(404, f"no schedule action {action!r}")
        try:
            user, fields = await writer(request, f"schedule.{action}", schedule_id)
        except _Denied as exc:
            return denied(request, exc)
        try:
            if action == "delete":
                store.delete_schedule(schedule_id)
            else:
                store.set_paused(schedule_id, action == "pause")
        except LineageError as exc:
            audit(user, f"schedule.{action}", schedule_id, request, fields, f"refused: {exc}")
            raise HTTPException(404, str(exc)) from None
        audit(user, f"schedule.{action}", schedule_id, request, fields, "ok")
        if _wants_json(request):
            return JSONResponse({"id": schedule_id, "action": action})
        return RedirectResponse("/schedules", status_code=303)

    # ------------------------------------------------------------------ audit

    @app.get("/audit", response_class=HTMLResponse)
    def audit_log(request: Request, user: str = "", action: str = "", limit: int = 200):
        check_read(request)
        entries = store.audit_entries(user=user or None, action=action or None, limit=max(1, min(limit, 1000)))
        return page(request, "audit.html", entries=entries, filter_user=user, filter_action=action,
                    dumps=lambda value: json.dumps(value, sort_keys=True))

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz():
        return "ok"

    app.state.store, app.state.launcher, app.state.signer = store, launcher, signer
    return app


# ---------------------------------------------------------------------- helpers


def _started(request: Request, run_id: str, *, duplicate: bool) -> Response:
    if _wants_json(request):
        return JSONResponse({"run_id": run_id, "duplicate": duplicate}, status_code=200 if duplicate else 201)
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


def _promote(store: LineageStore, run, *, confirmed: bool) -> str:
    """Make `run`'s evaluated model and decoder production (what the pipeline's gate does
    automatically; here a person decides, and the audit log says who). Only what the run page
    offers (views.promotion), and only confirmed: the form's `confirm` box says the person means
    it, also for a run whose gate failed."""
    if run.status != "succeeded":
        raise EmuError(f"run {run.id} is {run.status}; only a succeeded run's model can be promoted")
    executions = store.list_executions(run.id)
    offer = views.promotion(store, run, executions)
    if not offer["offered"]:
        raise EmuError(f"run {run.id}: {offer['reason'].rstrip('.')}; nothing to promote")
    if not confirmed:
        raise EmuError("promotion not confirmed: tick the confirmation box (confirm=yes) to replace the production "
                       "model" + (" although this run's gate failed" if offer["gate_failed"] else ""))
    rows = views.artifacts(store, run, executions)
    model = offer["model"]
    decoder = next((r for r in rows if r["stage"] == "decoder" and r["type"] == "decoder"), None)
    metrics = {k: v for k, v in views.evaluation_of(store, executions).items() if k != "gate_passed"}
    return store.promote(run.id, model_md5=model["md5"], decoder_md5=decoder["md5"] if decoder else None,
                         metrics=metrics)


def _same_token(sent: str, expected: str) -> bool:
    """Constant-time comparison of a submitted token (any characters) with the session's."""
    return bool(sent) and hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8"))


def _retrain_request(body: dict[str, Any]) -> RetrainRequest:
    """The run a retrain or a new schedule asks for (the form's or the JSON body's fields)."""
    return RetrainRequest(preset=str(body.get("preset") or "tiny"), data=str(body.get("data") or ""),
                          overrides=_overrides_of(body.get("overrides")))


def _overrides_of(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return parse_overrides(str(value or ""))


async def _json_body(request: Request) -> dict[str, Any]:
    """The JSON object a request sent; {} for no body; 415 for a body that is neither form nor JSON."""
    if "application/json" not in request.headers.get("content-type", ""):
        if not _is_form(request) and await request.body():
            raise HTTPException(415, "send a form (application/x-www-form-urlencoded) or a JSON object "
                                     "(Content-Type: application/json)")
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the request body must be a JSON object")
    return body


def _is_form(request: Request) -> bool:
    kind = request.headers.get("content-type", "")
    return kind.startswith("application/x-www-form-urlencoded") or kind.startswith("multipart/form-data")


def _wants_json(request: Request) -> bool:
    return (request.url.path.startswith("/api/") or "application/json" in request.headers.get("content-type", "")
            or request.headers.get("accept", "").startswith("application/json"))


def _safe_next(target: str) -> str:
    """Only same-site paths after login (no open redirect to another host)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/runs"
    return target


def _set_cookie(response: Response, value: str, config: DashboardConfig) -> None:
    response.set_cookie(COOKIE, value, max_age=int(config.session_hours * 3600), httponly=True, samesite="lax",
                        secure=config.cookie_secure, path="/")


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    if value < 1024:
        return f"{value} B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"
