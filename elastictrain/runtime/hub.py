"""The driver's mailbox: workers push report and event records, the driver pulls them."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0, max_concurrency=8)
class Hub:
    """Holds records until the driver pulls them; costs no CPU reservation."""

    def __init__(self) -> None:
        self._records: list[dict] = []

    def push(self, records: list[dict]) -> None:
        self._records.extend(records)

    def pull(self) -> list[dict]:
        records, self._records = self._records, []
        return records
