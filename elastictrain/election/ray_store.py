"""KVStore on Ray's GCS internal KV: every process of a Ray cluster reaches it."""

from __future__ import annotations

from typing import Optional

from ray.experimental import internal_kv


class RayKVStore:
    """One namespace per run, so runs on a shared cluster never see each other's keys."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def put_if_absent(self, key: str, value: bytes) -> bool:
        existed = internal_kv._internal_kv_put(key.encode(), value, overwrite=False, namespace=self.namespace)
        return not existed

    def put(self, key: str, value: bytes) -> None:
        internal_kv._internal_kv_put(key.encode(), value, overwrite=True, namespace=self.namespace)

    def get(self, key: str) -> Optional[bytes]:
        return internal_kv._internal_kv_get(key.encode(), namespace=self.namespace)

    def keys(self, prefix: str) -> list[str]:
        return [k.decode() for k in internal_kv._internal_kv_list(prefix.encode(), namespace=self.namespace)]

    def delete(self, key: str) -> None:
        internal_kv._internal_kv_del(key.encode(), namespace=self.namespace)
