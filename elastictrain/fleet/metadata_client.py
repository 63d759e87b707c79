"""A small HTTP client for a cloud's instance metadata service: short timeouts, no proxy, no redirect,
size-capped answers, and every network problem turned into None plus one log line per kind of problem.

Standard library only (urllib). The watchers in `fleet.notices` poll through it every second or so
for the whole run, so nothing here may raise and nothing may log on every poll.
"""

from __future__ import annotations

import http.client
import logging
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Mapping, Optional

log = logging.getLogger("elastictrain.fleet.notices")

MAX_BODY = 64 * 1024
"""Bytes read of one answer; a longer one is refused (a metadata answer is a few hundred bytes)."""


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: its status, its headers (names in lower case) and its body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def text(self) -> str:
        return self.body.decode("utf-8", "replace").strip()


class ProblemLog:
    """Logs each kind of problem with a provider's metadata service once; later ones of that kind are
    only counted (a service that answers garbage every second must not fill the log)."""

    def __init__(self, provider: str, logger: logging.Logger = log) -> None:
        self.provider = provider
        self.counts: dict[str, int] = {}
        self._log = logger

    def note(self, kind: str, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] == 1:
            self._log.warning("%s metadata service: %s%s; ignored (polling goes on, further ones are not logged)",
                              self.provider, kind, f" ({detail[:200]})" if detail else "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - a redirect is an answer, not followed
        return None


class MetadataClient:
    """Requests to one metadata base URL (e.g. 'http://169.254.169.254', or a test's 'http://127.0.0.1:PORT').

    Args:
        base: scheme, host and port of the service.
        timeout_s: connect and read timeout of each request.
        problems: where network problems are noted (once per kind).
    """

    def __init__(self, base: str, timeout_s: float, problems: ProblemLog) -> None:
        self.base = base.rstrip("/")
        self.timeout_s = timeout_s
        self.problems = problems
        # A metadata service is reached directly: never through HTTP(S)_PROXY from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)

    def request(self, method: str, path: str, headers: Mapping[str, str]) -> Optional[Reply]:
        """The answer to `method path`, or None when there was none (timeout, refused, broken, too large)."""
        data = b"" if method in ("PUT", "POST") else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=dict(headers))
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                return self._reply(resp.status, resp.headers, resp)
        except urllib.error.HTTPError as exc:
            try:
                return self._reply(exc.code, exc.headers, exc)
            finally:
                exc.close()
        except urllib.error.URLError as exc:
            self._network_problem(exc.reason)
        except (TimeoutError, socket.timeout) as exc:
            self._network_problem(exc)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.problems.note("broken answer", f"{type(exc).__name__}: {exc}")
        return None

    def _reply(self, status: int, headers, body_file) -> Optional[Reply]:
        body = body_file.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            self.problems.note("answer too large", f"over {MAX_BODY} bytes")
            return None
        names = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        return Reply(int(status), names, body)

    def _network_problem(self, reason: object) -> None:
        if isinstance(reason, (TimeoutError, socket.timeout)):
            self.problems.note("timeout", f"no answer within {self.timeout_s} s")
        elif isinstance(reason, ConnectionRefusedError):
            self.problems.note("connection refused", str(reason))
        else:
            self.problems.note("unreachable", f"{type(reason).__name__}: {reason}")
