"""A tiny HTTP server that speaks the few Kubernetes API calls the platform makes, for tests:

    POST   /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs        (checked against the CRD: 422)
    GET    /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs/NAME
    DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs/NAME
    GET    /api/v1/namespaces/NS/pods?labelSelector=jobset.sigs.k8s.io/jobset-name=NAME
    GET    /api/v1/namespaces/NS/pods/POD/log?container=node&follow=true   (chunked, as the log grows;
           each line stamped as the kubelet does with timestamps=true)

`KubeRayAPI` speaks the RayJob calls the same way (and GET of its RayClusters, whose head runs
`image`) and plays KubeRay for real: a RayJob created on a RayCluster it knows has its entrypoint
run here as the submitter would (a subprocess), its output served as the submitter pod's log while
it runs, and its exit status as the Ray job's status (the submitter pod itself exits 0, as
KubeRay's does: it ends with `ray job logs --follow`). On an unknown cluster the RayJob stays
Initializing, as with KubeRay.

KubeAPI plays the Trainer controller for a created TrainJob: on the first GET its node pods are
Running and start logging `lines`; once their logs are written the job ends in `outcome`
("Complete" or "Failed", with `exit_code` on a failed node). With `drop_after`, the first log
stream of each pod breaks off after that many lines (a dropped connection) while the pod runs on,
or, with `exit_on_drop`, as its container exits; a later request gets the whole log again (a
window wider than it). The real kubernetes client
talks to it through `client()`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from tests import k8s_schema


def kubelet_stamp(seconds: float) -> str:
    """A time as the kubelet stamps log lines: RFC 3339 in UTC, nanoseconds with trailing zeros
    dropped (Go's RFC3339Nano), so stamps do not sort as strings."""
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    fraction = f".{nanos:09d}".rstrip("0") if nanos else ""
    return datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def _stamped(query: dict) -> bool:
    """timestamps=true asked for (the client sends "True"; the API server reads Go's ParseBool)."""
    return query.get("timestamps", [""])[0].lower() in ("true", "1")


def _chunk(wfile, line: str) -> None:
    """One log line as a chunk of a chunked reply."""
    data = line.encode()
    wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    wfile.flush()


class KubeAPI:
    def __init__(self, outcome: str = "Complete", lines: int = 3, exit_code: int = 0, reason: str = "",
                 drop_after: int = 0, exit_on_drop: bool = False) -> None:
        self.outcome, self.lines, self.exit_code, self.reason = outcome, lines, exit_code, reason
        self.drop_after, self.exit_on_drop = drop_after, exit_on_drop
        #: (pod, query) of every log request
        self.log_requests: list[tuple[str, dict]] = []
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.gets = 0
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> KubeAPI:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def client(self):
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    # ---- the controller's view --------------------------------------------------------------
    def _pods(self, job: dict) -> list[dict]:
        nodes = job["spec"]["trainer"]["numNodes"]
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        done = self._job_done(job)
        pods = []
        for node in range(nodes):
            failed = done and self.outcome == "Failed" and node == nodes - 1
            state = ({"terminated": {"exitCode": self.exit_code if failed else 0, "reason": "Error" if failed
                                     else "Completed"}} if done else {"running": {}})
            pods.append({"metadata": {"name": f"{name}-node-0-{node}", "namespace": ns,
                                      "labels": {"jobset.sigs.k8s.io/jobset-name": name}},
                         "status": {"phase": ("Failed" if failed else "Succeeded") if done else "Running",
                                    "containerStatuses": [{"name": "node", "ready": not done, "restartCount": 0,
                                                           "image": "emu", "imageID": "", "state": state}]}})
        return pods

    def _job_done(self, job: dict) -> bool:
        return len(self._logged) >= job["spec"]["trainer"]["numNodes"]

    def _handler(self):
        api = self

        class Handler(_JobHandler):
            fake, api_prefix, plural = api, ["apis", "trainer.kubeflow.org", "v1alpha1"], "trainjobs"

            def do_POST(self) -> None:
                body = self._created()
                if body is None:
                    return None
                body.setdefault("status", {})
                with api._lock:
                    api.created.append(body)
                self._send(201, body)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts, query = url.path.strip("/").split("/"), parse_qs(url.query)
                if parts[:2] == ["apis", "trainer.kubeflow.org"]:
                    job = self._job(parts[-1])
                    if job is None:
                        return self._send(404, {"kind": "Status", "code": 404})
                    api.gets += 1
                    if api._job_done(job):
                        job["status"] = {"conditions": [{"type": api.outcome, "status": "True",
                                                         "reason": api.reason or f"Job{api.outcome}",
                                                         "message": f"jobset {api.outcome.lower()}",
                                                         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
                    return self._send(200, job)
                if parts[:2] == ["api", "v1"] and parts[-1] == "pods":
                    selector = query.get("labelSelector", [""])[0]
                    name = selector.partition("=")[2]
                    job = self._job(name)
                    items = api._pods(job) if job is not None and api.gets else []
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if parts[:2] == ["api", "v1"] and parts[-1] == "log":
                    pod = parts[-2]
                    with api._lock:
                        api.log_requests.append((pod, query))
                        first = sum(1 for p, _ in api.log_requests if p == pod) == 1
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(api.lines):
                        if first and api.drop_after and i == api.drop_after:
                            if api.exit_on_drop:  # the container exits as its stream breaks
                                with api._lock:
                                    api._logged.add(pod)
                            self.connection.shutdown(socket.SHUT_RDWR)  # broken off mid-stream
                            self.close_connection = True
                            return None
                        # Stamps a quarter second apart from a fixed time: ...:00Z, ...:00.25Z, ...
                        stamp = kubelet_stamp(1_780_000_000 + i / 4)
                        line = f"{stamp} step {i} on {pod}\n" if _stamped(query) \
                            else f"step {i} on {pod}\n"
                        _chunk(self.wfile, line)
                        time.sleep(0.02)
                    self.wfile.write(b"0\r\n\r\n")
                    with api._lock:
                        api._logged.add(pod)
                    return None
                self._send(404, {"kind": "Status", "code": 404})

        return Handler


class _JobHandler(BaseHTTPRequestHandler):
    """What both fakes answer alike: JSON replies, the created job by name, a POST checked against
    the CRD (404 for another resource, 422 with the schema's problems), a DELETE recorded."""

    fake: KubeAPI | KubeRayAPI
    api_prefix: list[str]
    plural: str

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def _send(self, code: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _job(self, name: str) -> dict | None:
        return next((j for j in self.fake.created if j["metadata"]["name"] == name), None)

    def _created(self) -> dict | None:
        """The POSTed job when it is one of ours and valid, else None (the error already sent)."""
        parts = urlparse(self.path).path.strip("/").split("/")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if parts[:3] != self.api_prefix or parts[-1] != self.plural:
            self._send(404, {"kind": "Status", "code": 404})
            return None
        problems = k8s_schema.problems(body)
        if problems:
            self._send(422, {"kind": "Status", "code": 422, "message": "; ".join(problems)})
            return None
        return body

    def do_DELETE(self) -> None:
        self.fake.deleted.append(urlparse(self.path).path.rstrip("/").split("/")[-1])
        self._send(200, {"kind": "Status", "status": "Success"})


class KubeRayAPI:
    """RayJobs (ray.io/v1) on the RayClusters `clusters`; their entrypoints run with `env` in `cwd`."""

    def __init__(self, env: dict[str, str], cwd: Path, clusters: tuple[str, ...] = ("emu-ray",),
                 image: str = "emu", unavailable: int = 0) -> None:
        self.env, self.cwd, self.clusters, self.image = env, Path(cwd), clusters, image
        #: GETs of a RayJob answered 503 first (an API server restarting)
        self.unavailable = unavailable
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self._runs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> KubeRayAPI:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for process, _ in self._runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig naming this server (what `kubernetes.config.load_kube_config` reads)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "emu"}}]}))
        return path

    def log_of(self, name: str) -> str:
        return self._runs[name][1].read_text(encoding="utf-8", errors="replace")

    # ---- the controller's view --------------------------------------------------------------
    def _status(self, job: dict) -> dict:
        name, cluster = job["metadata"]["name"], job["spec"]["clusterSelector"]["ray.io/cluster"]
        if cluster not in self.clusters:
            return {"jobDeploymentStatus": "Initializing"}
        process, _ = self._runs[name]
        code = process.poll()
        if code is None:
            return {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": cluster}
        return ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "rayClusterName": cluster} if code == 0
                else {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
                      "message": f"job entrypoint exited {code}", "rayClusterName": cluster})

    def _pod(self, job: dict) -> dict:
        name = job["metadata"]["name"]
        ended = self._runs[name][0].poll() is not None if name in self._runs else False
        state = {"terminated": {"exitCode": 0, "reason": "Completed"}} if ended else {"running": {}}
        return {"metadata": {"name": f"{name}-x7k2p", "namespace": job["metadata"]["namespace"],
                             "labels": {"batch.kubernetes.io/job-name": name}},
                "status": {"phase": "Succeeded" if ended else "Running", "containerStatuses": [
                    {"name": "ray-job-submitter", "ready": not ended, "restartCount": 0, "image": "emu",
                     "imageID": "", "state": state}]}}

    def _start(self, job: dict) -> None:
        name = job["metadata"]["name"]
        log = self.cwd / f"{name}.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(["bash", "-c", job["spec"]["entrypoint"]], cwd=self.cwd, env=self.env,
                                       stdout=sink, stderr=subprocess.STDOUT)
        self._runs[name] = (process, log)

    def _handler(self):
        api = self

        class Handler(_JobHandler):
            fake, api_prefix, plural = api, ["apis", "ray.io", "v1"], "rayjobs"

            def do_POST(self) -> None:
                body = self._created()
                if body is None:
                    return None
                api.created.append(body)
                if body["spec"]["clusterSelector"]["ray.io/cluster"] in api.clusters:
                    api._start(body)
                self._send(201, body)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts, query = url.path.strip("/").split("/"), parse_qs(url.query)
                if parts[:2] == ["apis", "ray.io"] and parts[-2] == "rayclusters":
                    if parts[-1] not in api.clusters:
                        return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                    head = {"name": "ray-head", "image": api.image}
                    return self._send(200, {"apiVersion": "ray.io/v1", "kind": "RayCluster",
                                            "metadata": {"name": parts[-1]},
                                            "spec": {"headGroupSpec": {"template": {"spec": {"containers": [head]}}}}})
                if parts[:2] == ["apis", "ray.io"]:
                    job = self._job(parts[-1])
                    if api.unavailable:
                        api.unavailable -= 1
                        return self._send(503, {"kind": "Status", "code": 503, "reason": "ServiceUnavailable"})
                    if job is None:
                        return self._send(404, {"kind": "Status", "code": 404})
                    return self._send(200, {**job, "status": api._status(job)})
                if parts[:2] == ["api", "v1"] and parts[-1] == "pods":
                    job = self._job(query.get("labelSelector", [""])[0].partition("=")[2])
                    items = [api._pod(job)] if job is not None and job["metadata"]["name"] in api._runs else []
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if parts[:2] == ["api", "v1"] and parts[-1] == "log":
                    return self._stream(parts[-2].removesuffix("-x7k2p"), query)
                self._send(404, {"kind": "Status", "code": 404})

            def _stream(self, name: str, query: dict) -> None:
                """The entrypoint's output as it is written, until it has exited (chunked, like
                follow=true), each line stamped with the time it was read when asked to."""
                process, log = api._runs[name]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                stamped = _stamped(query)

                def send(line: str) -> None:
                    _chunk(self.wfile, f"{kubelet_stamp(time.time())} {line}" if stamped else line)

                pending = b""
                with open(log, "rb") as source:
                    while True:
                        ended = process.poll() is not None
                        data = source.read()
                        pending += data
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            send(line.decode("utf-8", "replace") + "\n")
                        if not data and ended:
                            break
                        if not data:
                            time.sleep(0.1)
                if pending:
                    send(pending.decode("utf-8", "replace"))
                self.wfile.write(b"0\r\n\r\n")

        return Handler
