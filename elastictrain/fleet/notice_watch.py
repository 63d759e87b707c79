"""A worker's preemption-notice watcher thread: polls its cloud's metadata service, says what it saw
(a `cloud_notice` event) and asks the member to leave, once, on a notice that means the machine goes.

`start_notice_watch` is the one place that decides whether anything polls: the cloud comes from local
facts (`fleet.clouds`), so off a cloud, and on a cloud elastictrain does not know, no request is made.
It also reads the one environment variable of this part, ELASTICTRAIN_METADATA_ENDPOINT.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Mapping, Optional

from elastictrain.config import NoticeConfig
from elastictrain.events import Event, event
from elastictrain.fleet.clouds import detect_cloud
from elastictrain.fleet.metadata_client import log
from elastictrain.fleet.notices import DEFAULT_ENDPOINTS, Notice, Watcher, make_watcher

ENDPOINT_ENV = "ELASTICTRAIN_METADATA_ENDPOINT"
"""Set in a worker's environment (say a Ray node's `env_vars`), it replaces `NoticeConfig.endpoint` there."""


class NoticeWatch:
    """Polls `watcher` every `interval_s` on a daemon thread (the first poll at once).

    Each notice (by its key) is emitted once as a `cloud_notice` event; the first one that means the
    machine goes calls `on_leave(notice)`, and polling stops there.
    """

    def __init__(self, watcher: Watcher, interval_s: float, emit: Callable[[Event], None],
                 on_leave: Callable[[Notice], None]) -> None:
        self.watcher = watcher
        self.interval_s = interval_s
        self._emit = emit
        self._on_leave = on_leave
        self._seen: set[tuple[str, str]] = set()
        self.left: Optional[Notice] = None
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"et-notices-{watcher.provider}", daemon=True)

    def start(self) -> "NoticeWatch":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling; waits for a poll in progress (bounded by the watcher's request timeouts)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def poll_once(self) -> Optional[Notice]:
        """One poll: the notice seen for the first time, or None."""
        self.polls += 1
        try:
            notice = self.watcher.poll()
        except Exception as exc:  # noqa: BLE001 - a watcher bug must not end the worker; it is logged once
            problems = getattr(self.watcher, "problems", None)
            if problems is not None:
                problems.note("watcher error", repr(exc))
            return None
        if notice is None or (notice.notice, notice.key) in self._seen:
            return None
        self._seen.add((notice.notice, notice.key))
        log.warning("%s notice %r: %s", notice.provider, notice.notice,
                    "leaving at the next step boundary" if notice.leave else "reported only")
        try:
            self._emit(event("cloud_notice", time=notice.received, provider=notice.provider, notice=notice.notice,
                             warning_s=notice.warning_s, leave=notice.leave, deadline=notice.deadline,
                             summary=notice.summary))
        except Exception:  # noqa: BLE001 - the driver learns of it from the leave anyway
            pass
        if notice.leave and self.left is None:
            self.left = notice
            self._on_leave(notice)
        return notice

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            if self.left is not None:
                return
            self._stop.wait(self.interval_s)


def notice_endpoint(config: NoticeConfig, provider: str, environ: Mapping[str, str] = os.environ) -> str:
    """Where `provider`'s metadata service is: ELASTICTRAIN_METADATA_ENDPOINT, else `config.endpoint`,
    else the provider's real address."""
    return environ.get(ENDPOINT_ENV) or config.endpoint or DEFAULT_ENDPOINTS[provider]


def start_notice_watch(
    config: NoticeConfig,
    labels: Optional[Mapping[str, object]],
    emit: Callable[[Event], None],
    on_leave: Callable[[Notice], None],
    environ: Mapping[str, str] = os.environ,
) -> Optional[NoticeWatch]:
    """Start watching this node's cloud for notices, or return None (cloud 'off' or not known: nothing
    polls, and no packet goes to any metadata address).

    Args:
        config: `FailureConfig.notices`.
        labels: the node's Ray labels.
        emit: where `cloud_notice` events go.
        on_leave: called once, from the watcher thread, with the first notice that means the machine goes.
        environ: the worker's environment (ELASTICTRAIN_METADATA_ENDPOINT).
    """
    cloud = detect_cloud(config.cloud, labels, config.dmi_root)
    if cloud is None:
        return None
    endpoint = notice_endpoint(config, cloud.provider, environ)
    watcher = make_watcher(cloud.provider, endpoint, timeout_s=config.timeout_s,
                           leave_on_rebalance=config.leave_on_rebalance)
    log.info("watching %s preemption notices at %s every %s s (cloud from %s)", cloud.provider, endpoint,
             config.poll_interval_s, cloud.source)
    return NoticeWatch(watcher, config.poll_interval_s, emit, on_leave).start()
