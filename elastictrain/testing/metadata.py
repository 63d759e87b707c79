"""Fake cloud metadata services for tests and benchmarks: one small HTTP server per provider on
127.0.0.1 (port 0), speaking the real paths, headers, token flow and JSON of AWS IMDSv2, GCP's
metadata server and Azure's Scheduled Events, with switches for a notice, garbage, wrong tokens,
server errors and slow answers. Each counts the requests it served; `close()` joins its threads.

    with FakeAwsMetadata() as aws:
        watcher = AwsWatcher(aws.url)
        aws.interrupt("terminate", in_s=120)
        watcher.poll().warning_s   # about 120
"""

from __future__ import annotations

import base64
import email.utils
import json
import threading
import time
import urllib.parse
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

Answer = tuple[int, dict[str, str], bytes]

GARBAGE = b"{\"action\": \"terminate\", \"time\": \x00 not json"


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every request thread: a test leaves none behind
    block_on_close = True


class FakeMetadata:
    """The common part: a threaded HTTP server on 127.0.0.1 that answers through `answer()`."""

    provider = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.requests: Counter[str] = Counter()
        """Requests served, by path (without the query)."""
        self.garbage = False
        self.status: Optional[int] = None
        self.delay_s = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                path, _, query = self.path.partition("?")
                with fake._lock:
                    fake.requests[path] += 1
                if fake.delay_s:
                    fake._closing.wait(fake.delay_s)  # a slow service; close() ends the wait
                headers = {k.lower(): v for k, v in self.headers.items()}
                length = min(int(headers.get("content-length") or 0), 64 * 1024)
                headers["body"] = self.rfile.read(length).decode("utf-8", "replace") if length > 0 else ""
                status, out_headers, body = fake.answer(self.command, path, urllib.parse.parse_qs(query), headers)
                try:
                    self.send_response(status)
                    for name, value in out_headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (its timeout): nothing to answer

            do_GET = do_PUT = do_POST = _serve

            def log_message(self, *args) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-{self.provider}-metadata", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL to give `NoticeConfig.endpoint` or ELASTICTRAIN_METADATA_ENDPOINT."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests[path]

    def serve_garbage(self, on: bool = True) -> None:
        """Answer notice paths with bytes that are not what the provider sends."""
        self.garbage = on

    def fail_with(self, status: Optional[int]) -> None:
        """Answer every request with this HTTP status (say 500); None: normal answers again."""
        self.status = status

    def slow(self, delay_s: float) -> None:
        """Wait this long before each answer (0: answer at once)."""
        self.delay_s = delay_s

    def answer(self, method: str, path: str, query: dict, headers: dict) -> Answer:
        raise NotImplementedError

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _text(status: int, body: str | bytes, **headers: str) -> Answer:
    data = body.encode() if isinstance(body, str) else body
    return status, {"Content-Type": "text/plain", **headers}, data


def _json(status: int, body: object, **headers: str) -> Answer:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(body).encode()


def _fake_signature(text: str) -> str:
    return base64.b64encode(("signed:" + text).encode()).decode()


class FakeAwsMetadata(FakeMetadata):
    """EC2's IMDSv2: PUT /latest/api/token, then GETs carrying X-aws-ec2-metadata-token (401 without a
    valid one); spot/instance-action (404 until `interrupt`), events/recommendations/rebalance, and the
    instance identity document with its signature and PKCS#7."""

    provider = "aws"

    def __init__(self, instance_id: str = "i-0123456789abcdef0", region: str = "us-east-1") -> None:
        self.tokens: set[str] = set()
        self.tokens_issued = 0
        self.refuse_tokens = False
        self.action: Optional[dict] = None
        self.rebalance_at: Optional[str] = None
        self.document = json.dumps({"instanceId": instance_id, "region": region, "instanceType": "p4d.24xlarge",
                                    "availabilityZone": region + "a", "accountId": "123456789012",
                                    "pendingTime": "2026-01-01T00:00:00Z"}, indent=2)
        super().__init__()

    def interrupt(self, action: str = "terminate", in_s: float = 120.0) -> float:
        """Schedule a spot interruption `in_s` from now (whole seconds, as EC2 writes it); returns its time."""
        when = datetime.fromtimestamp(int(time.time() + in_s), tz=timezone.utc)
        self.action = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
        return when.timestamp()

    def recommend_rebalance(self) -> None:
        self.rebalance_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def expire_tokens(self) -> None:
        """Revoke every token handed out (the next GET gets 401; a new token works)."""
        with self._lock:
            self.tokens.clear()

    def answer(self, method, path, query, headers) -> Answer:
        if path == "/latest/api/token":
            if method != "PUT" or "x-aws-ec2-metadata-token-ttl-seconds" not in headers:
                return _text(400, "Bad Request")
            with self._lock:
                self.tokens_issued += 1
                token = f"AQAEA-token-{self.tokens_issued}"
                self.tokens.add(token)
            return _text(200, token)
        with self._lock:
            valid = headers.get("x-aws-ec2-metadata-token") in self.tokens and not self.refuse_tokens
        if not valid:
            return _text(401, "Unauthorized")
        if self.status is not None:
            return _text(self.status, "Internal Server Error")
        if path == "/latest/meta-data/spot/instance-action":
            if self.garbage:
                return _text(200, GARBAGE)
            return _json(200, self.action) if self.action else _text(404, "Not Found")
        if path == "/latest/meta-data/events/recommendations/rebalance":
            if self.garbage:
                return _text(200, b"[1, 2")
            return _json(200, {"noticeTime": self.rebalance_at}) if self.rebalance_at else _text(404, "Not Found")
        if path == "/latest/dynamic/instance-identity/document":
            return _text(200, self.document)
        if path == "/latest/dynamic/instance-identity/signature":
            return _text(200, _fake_signature(self.document))
        if path == "/latest/dynamic/instance-identity/pkcs7":
            return _text(200, _fake_signature("pkcs7:" + self.document))
        return _text(404, "Not Found")


class FakeGcpMetadata(FakeMetadata):
    """Compute Engine's metadata server: requests must carry `Metadata-Flavor: Google` (403 otherwise) and
    answers carry it; instance/preempted, instance/maintenance-event and the identity token."""

    provider = "gcp"

    def __init__(self) -> None:
        self.preempted = False
        self.maintenance = "NONE"
        self.send_flavor = True
        super().__init__()

    def preempt(self) -> None:
        self.preempted = True

    def answer(self, method, path, query, headers) -> Answer:
        flavor = {"Metadata-Flavor": "Google"} if self.send_flavor else {}
        if headers.get("metadata-flavor") != "Google":
            return _text(403, "Missing Metadata-Flavor:Google header.", **flavor)
        if self.status is not None:
            return _text(self.status, "error", **flavor)
        base = "/computeMetadata/v1/instance/"
        if path == base + "preempted":
            return _text(200, "maybe?" if self.garbage else ("TRUE" if self.preempted else "FALSE"), **flavor)
        if path == base + "maintenance-event":
            return _text(200, "\x00garbage" if self.garbage else self.maintenance, **flavor)
        if path == base + "service-accounts/default/identity":
            audience = (query.get("audience") or [""])[0]
            if not audience:
                return _text(400, "non-empty audience parameter required", **flavor)
            seg = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
            claims = {"aud": audience, "iss": "https://accounts.google.com",
                      "google": {"compute_engine": {"instance_id": "1234567890", "zone": "europe-west4-a"}}}
            return _text(200, f"{seg({'alg': 'RS256'})}.{seg(claims)}.{seg({'sig': 'fake'})}", **flavor)
        return _text(404, "Not Found", **flavor)


class FakeAzureMetadata(FakeMetadata):
    """Azure's IMDS: requests must carry `Metadata: true` (400 otherwise); Scheduled Events, the VM's name
    and the attested data document. POSTed `StartRequests` are kept in `started`."""

    provider = "azure"

    def __init__(self, vm_name: str = "et-vm-1") -> None:
        self.vm_name = vm_name
        self.events: list[dict] = []
        self.incarnation = 1
        self.started: list[str] = []
        super().__init__()

    def schedule(self, event_type: str = "Preempt", in_s: float = 30.0, resource: Optional[str] = None) -> float:
        """Add a scheduled event for `resource` (default: this VM) `in_s` from now; returns its NotBefore."""
        when = int(time.time() + in_s)
        with self._lock:
            self.incarnation += 1
            self.events.append({
                "EventId": f"event-{self.incarnation}", "EventType": event_type, "ResourceType": "VirtualMachine",
                "Resources": [resource or self.vm_name], "EventStatus": "Scheduled",
                "NotBefore": email.utils.formatdate(when, usegmt=True), "Description": "", "EventSource": "Platform",
                "DurationInSeconds": -1,
            })
        return float(when)

    def answer(self, method, path, query, headers) -> Answer:
        if headers.get("metadata") != "true":
            return _json(400, {"error": "Bad request. Required metadata header not specified"})
        if self.status is not None:
            return _text(self.status, "error")
        if path == "/metadata/scheduledevents":
            if method == "POST":  # {"StartRequests": [{"EventId": ...}]}: acknowledged
                try:
                    ids = [r["EventId"] for r in json.loads(headers["body"])["StartRequests"]]
                except (ValueError, KeyError, TypeError):
                    return _text(400, "Bad request")
                with self._lock:
                    self.started.extend(ids)
                return _text(200, "")
            if self.garbage:
                return _text(200, b"{\"Events\": {\"not\": \"a list\"}}")
            with self._lock:
                return _json(200, {"DocumentIncarnation": self.incarnation, "Events": list(self.events)})
        if path == "/metadata/instance/compute/name":
            return _text(200, self.vm_name)
        if path == "/metadata/attested/document":
            return _json(200, {"encoding": "pkcs7", "signature": _fake_signature(self.vm_name + str(query))})
        return _text(404, "Not Found")
