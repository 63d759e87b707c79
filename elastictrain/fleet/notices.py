"""Preemption notices from the clouds' metadata services: one small watcher per provider.

Each watcher's `poll()` asks its provider's service once and returns a `Notice` or None; bad answers
(a refused token, 5xx, garbage or wrong-shaped JSON, timeouts, a refused connection) are logged once
per kind of problem and read as "no notice". `fetch_identity()` returns the provider's signed
instance identity (for a manifest's provenance) as plain, size-capped strings, or None.

Nothing here decides whether to poll: `fleet.clouds` does, from local facts, and
`fleet.notice_watch` runs a watcher on a thread. Standard library only.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Optional, Protocol

from elastictrain.fleet.metadata_client import MetadataClient, ProblemLog, Reply, log

DEFAULT_ENDPOINTS = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
"""Each provider's metadata service; `NoticeConfig.endpoint` or ELASTICTRAIN_METADATA_ENDPOINT replaces it."""

GCP_PREEMPTION_WARNING_S = 30.0
"""GCP stops a preempted VM about 30 s after `instance/preempted` turns TRUE; its answer carries no time."""
MAX_SUMMARY = 512
MAX_IDENTITY = 16 * 1024
"""Characters kept of one identity string; a longer one is refused (real ones are a few KiB)."""


@dataclass(frozen=True)
class Notice:
    """A provider's word that this machine will be reclaimed (or may be soon)."""

    provider: str
    notice: str
    """What kind: 'spot_terminate', 'spot_stop', 'spot_hibernate', 'rebalance' (AWS); 'preempted',
    'maintenance_terminate', 'maintenance_migrate' (GCP); 'preempt', 'terminate', ... (Azure EventType)."""
    leave: bool
    """Whether the member should save and leave: False for the softer ones (a rebalance recommendation
    unless `leave_on_rebalance`, a live migration)."""
    received: float
    """Wall time the watcher saw it."""
    deadline: Optional[float]
    """Wall time the machine goes, when the provider says (None: it does not)."""
    key: str
    """Tells one notice from another of the same kind (a watcher reports each key once)."""
    summary: str = ""
    """The provider's answer, cut to `MAX_SUMMARY` characters."""

    @property
    def warning_s(self) -> Optional[float]:
        """Seconds from receipt to the deadline, or None without one."""
        return None if self.deadline is None else self.deadline - self.received


class Watcher(Protocol):
    provider: str

    def poll(self) -> Optional[Notice]: ...

    def fetch_identity(self) -> Optional[dict[str, str]]: ...


def _summary(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body, sort_keys=True, default=str)
    return text[:MAX_SUMMARY]


def _json(reply: Reply, problems: ProblemLog, what: str) -> Any:
    try:
        return json.loads(reply.body)
    except (ValueError, UnicodeDecodeError) as exc:
        problems.note("garbage JSON", f"{what}: {exc}")
        return None


def _bad_status(problems: ProblemLog, reply: Reply, what: str) -> None:
    kind = "server error" if reply.status >= 500 else f"HTTP {reply.status}"
    problems.note(kind, f"{what} answered {reply.status}")


def _capped(value: Any, problems: ProblemLog, what: str, pattern: str = r"[\x20-\x7e\r\n]*") -> Optional[str]:
    """`value` when it is a string of printable text within `MAX_IDENTITY`; None (one log line) otherwise."""
    if not isinstance(value, str) or not value or len(value) > MAX_IDENTITY or not re.fullmatch(pattern, value):
        problems.note("bad identity document", f"{what} is not a short printable string")
        return None
    return value


class AwsWatcher:
    """EC2 spot instance actions and rebalance recommendations, over IMDSv2 (a session token first).

    Args:
        endpoint: the metadata base URL (default: the real one).
        timeout_s: per request.
        leave_on_rebalance: a rebalance recommendation asks the member to leave too (default: it is
            only reported).
        clock: wall time, for tests.
    """

    provider = "aws"
    TOKEN_TTL_S = 21600
    ACTIONS = ("terminate", "stop", "hibernate")

    def __init__(self, endpoint: Optional[str] = None, *, timeout_s: float = 1.0, leave_on_rebalance: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.problems = ProblemLog(self.provider)
        self.client = MetadataClient(endpoint or DEFAULT_ENDPOINTS["aws"], timeout_s, self.problems)
        self.leave_on_rebalance = leave_on_rebalance
        self._clock = clock
        self._token: Optional[str] = None
        self._token_until = 0.0

    def _session_token(self, refresh: bool = False) -> Optional[str]:
        if self._token is not None and not refresh and time.monotonic() < self._token_until:
            return self._token
        self._token = None
        reply = self.client.request("PUT", "/latest/api/token",
                                    {"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)})
        if reply is None:
            return None
        token = reply.text()
        if reply.status != 200 or not re.fullmatch(r"[\x21-\x7e]{1,4096}", token):
            self.problems.note("token refused", f"PUT /latest/api/token answered {reply.status}")
            return None
        self._token, self._token_until = token, time.monotonic() + self.TOKEN_TTL_S - 60
        return token

    def _get(self, path: str) -> Optional[Reply]:
        """GET with the session token; a 401 (the token expired or was revoked) takes a new one, once."""
        for attempt in range(2):
            token = self._session_token(refresh=attempt > 0)
            if token is None:
                return None
            reply = self.client.request("GET", path, {"X-aws-ec2-metadata-token": token})
            if reply is None or reply.status != 401:
                return reply
        self.problems.note("token refused", f"GET {path} answered 401 with a new token")
        return None

    def poll(self) -> Optional[Notice]:
        now = self._clock()
        reply = self._get("/latest/meta-data/spot/instance-action")
        if reply is None:
            return None  # no answer: the second path would time out too
        if reply.status == 200:
            notice = self._instance_action(reply, now)
            if notice is not None:
                return notice
        elif reply.status != 404:  # 404: no action scheduled
            _bad_status(self.problems, reply, "spot/instance-action")
        reply = self._get("/latest/meta-data/events/recommendations/rebalance")
        if reply is None or reply.status == 404:
            return None
        if reply.status != 200:
            _bad_status(self.problems, reply, "events/recommendations/rebalance")
            return None
        body = _json(reply, self.problems, "events/recommendations/rebalance")
        if body is None:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("noticeTime"), str):
            self.problems.note("wrong-shaped answer", "rebalance without a noticeTime string")
            return None
        return Notice("aws", "rebalance", self.leave_on_rebalance, now, None,
                      key=f"rebalance:{body['noticeTime'][:64]}", summary=_summary(body))

    def _instance_action(self, reply: Reply, now: float) -> Optional[Notice]:
        body = _json(reply, self.problems, "spot/instance-action")
        if body is None:
            return None
        action = body.get("action") if isinstance(body, dict) else None
        when = _iso_time(body.get("time")) if isinstance(body, dict) else None
        if action not in self.ACTIONS or when is None:
            self.problems.note("wrong-shaped answer", f"spot/instance-action: {_summary(body)[:120]}")
            return None
        return Notice("aws", f"spot_{action}", True, now, when, key=f"{action}:{body['time']}", summary=_summary(body))

    def fetch_identity(self) -> Optional[dict[str, str]]:
        """The instance identity document and its signatures (base64 RSA-SHA256, and PKCS#7), or None."""
        try:
            out = {"provider": "aws"}
            for name, path in (("document", "document"), ("signature", "signature"), ("pkcs7", "pkcs7")):
                reply = self._get(f"/latest/dynamic/instance-identity/{path}")
                if reply is None or reply.status != 200:
                    if reply is not None:
                        _bad_status(self.problems, reply, f"instance-identity/{path}")
                    return None
                text = _capped(reply.text(), self.problems, f"instance-identity/{path}")
                if text is None:
                    return None
                out[name] = text
            if not isinstance(json.loads(out["document"]), dict):
                raise ValueError("the document is not a JSON object")
            return out
        except Exception as exc:  # noqa: BLE001 - an identity is optional: never fail the caller
            self.problems.note("bad identity document", f"{type(exc).__name__}: {exc}")
            return None


class GcpWatcher:
    """Compute Engine's `instance/preempted` and `instance/maintenance-event`, with `Metadata-Flavor: Google`
    both ways (an answer without it did not come from the metadata server)."""

    provider = "gcp"
    HEADERS = {"Metadata-Flavor": "Google"}
    MAINTENANCE = {"TERMINATE_ON_HOST_MAINTENANCE": ("maintenance_terminate", True),
                   "MIGRATE_ON_HOST_MAINTENANCE": ("maintenance_migrate", False)}

    def __init__(self, endpoint: Optional[str] = None, *, timeout_s: float = 1.0, audience: str = "elastictrain",
                 clock: Callable[[], float] = time.time) -> None:
        self.problems = ProblemLog(self.provider)
        self.client = MetadataClient(endpoint or DEFAULT_ENDPOINTS["gcp"], timeout_s, self.problems)
        self.audience = audience
        self._clock = clock

    def _get(self, path: str) -> Optional[str]:
        reply = self.client.request("GET", "/computeMetadata/v1/instance/" + path, self.HEADERS)
        if reply is None:
            return None
        if reply.headers.get("metadata-flavor") != "Google":
            self.problems.note("answer without Metadata-Flavor: Google", f"instance/{path.split('?')[0]}")
            return None
        if reply.status != 200:
            _bad_status(self.problems, reply, f"instance/{path.split('?')[0]}")
            return None
        return reply.text()

    def poll(self) -> Optional[Notice]:
        now = self._clock()
        preempted = self._get("preempted")
        if preempted is None:
            return None
        if preempted == "TRUE":
            return Notice("gcp", "preempted", True, now, now + GCP_PREEMPTION_WARNING_S, key="preempted",
                          summary="instance/preempted: TRUE")
        if preempted != "FALSE":
            self.problems.note("unexpected value", f"instance/preempted: {preempted[:60]!r}")
        event = self._get("maintenance-event")
        if event is None or event == "NONE":
            return None
        known = self.MAINTENANCE.get(event)
        if known is None:
            self.problems.note("unexpected value", f"instance/maintenance-event: {event[:60]!r}")
            return None
        return Notice("gcp", known[0], known[1], now, None, key=event, summary=f"instance/maintenance-event: {event}")

    def fetch_identity(self) -> Optional[dict[str, str]]:
        """A Google-signed identity token (JWT, format=full) for `audience`, or None."""
        try:
            query = urllib.parse.urlencode({"audience": self.audience, "format": "full"})
            token = self._get(f"service-accounts/default/identity?{query}")
            token = _capped(token, self.problems, "identity token", r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
            if token is None:
                return None
            return {"provider": "gcp", "audience": self.audience, "token": token}
        except Exception as exc:  # noqa: BLE001
            self.problems.note("bad identity document", f"{type(exc).__name__}: {exc}")
            return None


class AzureWatcher:
    """Azure Scheduled Events: a `Preempt` (Spot eviction) or `Terminate`, `Reboot`, `Redeploy` for this VM;
    `NotBefore` is the deadline."""

    provider = "azure"
    HEADERS = {"Metadata": "true"}
    EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
    LEAVING = ("Preempt", "Terminate", "Reboot", "Redeploy")
    """Event types after which this process no longer runs; others (Freeze: a pause of seconds) are reported."""

    def __init__(self, endpoint: Optional[str] = None, *, timeout_s: float = 1.0, vm_name: Optional[str] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.problems = ProblemLog(self.provider)
        self.client = MetadataClient(endpoint or DEFAULT_ENDPOINTS["azure"], timeout_s, self.problems)
        self.vm_name = vm_name
        self._clock = clock

    def _get(self, path: str) -> Optional[Reply]:
        reply = self.client.request("GET", path, self.HEADERS)
        if reply is not None and reply.status != 200:
            _bad_status(self.problems, reply, path.split("?")[0])
            return None
        return reply

    def _name(self) -> Optional[str]:
        if self.vm_name is None:
            reply = self._get("/metadata/instance/compute/name?api-version=2021-02-01&format=text")
            name = reply.text() if reply is not None else ""
            if re.fullmatch(r"[\x21-\x7e]{1,128}", name):
                self.vm_name = name
        return self.vm_name

    def poll(self) -> Optional[Notice]:
        now = self._clock()
        reply = self._get(self.EVENTS_PATH)
        if reply is None:
            return None
        body = _json(reply, self.problems, "scheduledevents")
        if body is None:
            return None
        events = body.get("Events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            self.problems.note("wrong-shaped answer", "scheduledevents without an Events list")
            return None
        # Events of other VMs of the same availability set come too; a VM name not learned matches all.
        name = self._name() if events else None
        ours = [e for e in events if name is None or name in (e.get("Resources") or [])]
        for e in sorted(ours, key=lambda e: e.get("EventType") not in self.LEAVING):
            kind, event_id = e.get("EventType"), e.get("EventId")
            if not isinstance(kind, str) or not isinstance(event_id, str):
                self.problems.note("wrong-shaped answer", "an event without EventType or EventId")
                continue
            return Notice("azure", kind.lower()[:32], kind in self.LEAVING, now, _http_date(e.get("NotBefore")),
                          key=event_id[:128], summary=_summary(e))
        return None

    def fetch_identity(self, nonce: Optional[str] = None) -> Optional[dict[str, str]]:
        """The attested data document (PKCS#7 signed by Azure), or None."""
        try:
            path = "/metadata/attested/document?api-version=2020-09-01"
            if nonce is not None:
                path += "&" + urllib.parse.urlencode({"nonce": nonce})
            reply = self._get(path)
            body = _json(reply, self.problems, "attested/document") if reply is not None else None
            if not isinstance(body, dict):
                return None
            signature = _capped(body.get("signature"), self.problems, "attested signature")
            encoding = _capped(body.get("encoding"), self.problems, "attested encoding")
            if signature is None or encoding is None:
                return None
            base64.b64decode(signature, validate=True)
            out = {"provider": "azure", "encoding": encoding, "signature": signature}
            if nonce is not None:
                out["nonce"] = nonce
            return out
        except Exception as exc:  # noqa: BLE001
            self.problems.note("bad identity document", f"{type(exc).__name__}: {exc}")
            return None


def _iso_time(value: Any) -> Optional[float]:
    """Wall time of an ISO 8601 UTC time ('2026-12-03T20:00:00Z'), or None."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def _http_date(value: Any) -> Optional[float]:
    """Wall time of an RFC 1123 date ('Mon, 19 Sep 2016 18:29:47 GMT'), or None (Azure leaves it empty
    once an event has started)."""
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


WATCHERS = {"aws": AwsWatcher, "gcp": GcpWatcher, "azure": AzureWatcher}


def make_watcher(provider: str, endpoint: Optional[str] = None, *, timeout_s: float = 1.0,
                 leave_on_rebalance: bool = False) -> Watcher:
    """The watcher of `provider` ('aws', 'gcp', 'azure') on `endpoint` (None: the real service)."""
    if provider == "aws":
        return AwsWatcher(endpoint, timeout_s=timeout_s, leave_on_rebalance=leave_on_rebalance)
    if provider not in WATCHERS:
        raise ValueError(f"no notice watcher for {provider!r}: use one of {sorted(WATCHERS)}")
    return WATCHERS[provider](endpoint, timeout_s=timeout_s)


__all__ = ["Notice", "Watcher", "AwsWatcher", "GcpWatcher", "AzureWatcher", "make_watcher", "DEFAULT_ENDPOINTS", "log"]
