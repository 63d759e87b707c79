"""Storage: a small protocol (atomic put, get, list, delete, and optional extras) and one fsspec implementation.

Names are '/'-separated paths relative to the checkpoint URI and are checked
before any call (no '..', no absolute paths). `put` never leaves a partial
object under its final name: object stores write whole objects, and local
disks write a temporary file then rename it. Transient errors are retried with
exponential backoff.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import posixpath
import re
import secrets
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping, Optional, Protocol, TypeVar, Union

from elastictrain.checkpoint.credentials import credential_values, resolve_options, scrub_error

Buffer = Union[bytes, bytearray, memoryview]
T = TypeVar("T")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
TMP_MARK = ".tmp-"
_WRITE_SLICE = 4 << 20


def check_name(name: str) -> str:
    """Return `name` if it is a safe relative storage name; raise ValueError otherwise."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise ValueError(f"storage name {name!r} is not a plain relative path")
    return name


_SCHEME_TYPO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!//|:)")


def check_uri(uri: str) -> str:
    """Return `uri` unless it starts with a scheme not followed by '//' (say "s3:/bucket/run").

    fsspec takes such a URI for a relative local path: every save would succeed into the leading
    worker's working directory, and be gone with that machine.
    """
    if _has_password(uri):
        # the URI is in errors, events and logs: a password in it would be too
        raise ValueError(
            "checkpoint URI holds a password (not shown): remove it from the URI and give it in "
            "storage_options instead, e.g. password='env:VAR' (the variable read on each machine)"
        )
    m = _SCHEME_TYPO.match(uri)
    if m:
        scheme = m.group(1)
        raise ValueError(
            f"checkpoint URI starts with '{scheme}:' but not '{scheme}://' (a slash missing?); for a local "
            f"folder of that name, write ./{scheme}:... or file:///absolute/path"
        )
    return uri


def _has_password(uri: str) -> bool:
    """Whether `uri` is 'scheme://user:password@host/...'."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(uri).password is not None
    except ValueError:
        return False


class Storage(Protocol):
    """Where checkpoint objects live. URIs stay strings; names are relative to the root."""

    uri: str

    def put(self, name: str, parts: Iterable[Buffer]) -> None:
        """Write the concatenation of `parts` under `name`, all or nothing.

        `parts` may be produced lazily and iterated again on a retry; a part is read before the next
        one is requested (the producer may reuse its memory).
        """

    def get(self, name: str, size: Optional[int] = None) -> bytes:
        """The object's bytes. Raises FileNotFoundError if absent.

        `size`: the object's size when the caller knows it (a chunk's, from its manifest), a hint that
        lets a backend read a large object in parallel pieces.
        """

    def list(self, prefix: str) -> dict[str, int]:
        """{name: size} of every object under `prefix` (a folder name)."""

    def delete(self, names: Iterable[str]) -> None:
        """Remove objects; absent ones are ignored."""

    # Optional: `view(name)`, a context manager giving the object's bytes without a copy where it can;
    # `flush()`, which makes every put so far durable; `remove_stale_temporaries(prefixes, older_than_s)`,
    # which deletes what puts killed mid-write left behind; `discard(names)`, a best-effort `delete` in
    # fewer requests. Callers check with getattr.


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: I/O and connection errors, not missing objects or refused access."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)):
        return False
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3")


def with_retries(
    fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.05, max_delay: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn`, retrying transient errors with exponential backoff and jitter."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * (2**attempt))
            sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
    raise AssertionError("unreachable")


class FsspecStorage:
    """Storage on any fsspec filesystem (file://, memory://, s3://, ...).

    `fsync` (local disks only): each object is fsynced before it is renamed into place, and `flush`
    fsyncs the folders renamed into, so what `flush` returns for survives the machine crashing.
    Object stores are durable once a write returns, so `flush` has nothing to do there.
    """

    def __init__(
        self, uri: str, storage_options: dict | None = None, attempts: int = 5, fsync: bool = False,
        environ: Optional[Mapping[str, str]] = None,
    ):
        import fsspec

        self.uri = check_uri(uri)
        # 'env:VAR' credentials are read here, on the machine that opens the storage (`environ`: for tests)
        options = resolve_options(storage_options or {}, os.environ if environ is None else environ)
        self.secrets = credential_values(options)
        """The credential values in the options: what `scrub_error` hides in messages."""
        try:
            self.fs, root = fsspec.core.url_to_fs(uri, **options)
        except Exception as exc:
            clean = scrub_error(exc, self.secrets)
            if clean is None:
                raise
            raise clean from None
        self.root = root.rstrip("/")
        self.attempts = attempts
        self._local = "file" in _protocols(self.fs)
        self._s3 = "s3" in _protocols(self.fs)
        self.fsync = fsync and self._local
        self._unsynced: set[str] = set()  # folders with renames not yet fsynced
        self._top = os.path.dirname(self.root) or self.root  # the root's own entry counts too
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        return f"{self.root}/{check_name(name)}"

    def put(self, name: str, parts: Iterable[Buffer]) -> None:
        path = self._path(name)
        if self._local:
            with_retries(lambda: _put_local(path, parts, self.fsync), attempts=self.attempts)
            if self.fsync:
                folder = os.path.dirname(path)
                with self._lock:  # its folder, and the folders above it that the put may have created
                    while len(folder) >= len(self._top) and folder not in self._unsynced:
                        self._unsynced.add(folder)
                        folder = os.path.dirname(folder)
            return
        data = b"".join(bytes(p) for p in parts)  # each part copied as it comes: a producer may reuse its buffer
        with_retries(lambda: self.fs.pipe_file(path, data), attempts=self.attempts)

    def get(self, name: str, size: Optional[int] = None) -> bytes:
        path = self._path(name)
        # s3fs asks for the size (a HEAD) before each plain read, to split an object over its block
        # size into parallel ranges: worth a round trip for those, not for manifests and small chunks
        if self._s3 and (size is None or size <= getattr(self.fs, "default_block_size", 0)):
            return with_retries(lambda: self._get_s3(path), attempts=self.attempts)
        return with_retries(lambda: self.fs.cat_file(path), attempts=self.attempts)

    def _get_s3(self, path: str) -> bytes:
        """The whole object by one GET of an open byte range (no HEAD first)."""
        try:
            return self.fs.cat_file(path, start=0)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno != errno.EINVAL:
                raise  # what with_retries sees and, if transient, retries with backoff
            return self.fs.cat_file(path)  # S3 answers 416 for an empty object: no byte 0 to start at

    @contextlib.contextmanager
    def view(self, name: str) -> Iterator[Buffer]:
        """The object's bytes, valid inside the block. Local files are memory-mapped, not copied.

        Raises FileNotFoundError if absent.
        """
        path = self._path(name)
        if not self._local:
            yield self.get(name)
            return

        def open_map() -> tuple[object, Optional[mmap.mmap]]:
            fh = open(path, "rb", buffering=0)
            try:
                size = os.fstat(fh.fileno()).st_size
                return fh, (mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) if size else None)
            except BaseException:
                fh.close()
                raise

        fh, mapped = with_retries(open_map, attempts=self.attempts)
        data = memoryview(mapped) if mapped is not None else memoryview(b"")
        try:
            yield data
        finally:
            fh.close()
            try:
                data.release()
                if mapped is not None:
                    mapped.close()
            except BufferError:  # a view is still alive (say, in a traceback): the map closes when it is freed
                pass

    def flush(self) -> None:
        """Make every put so far durable: fsync the folders they were renamed into (with `fsync`).

        A folder whose fsync fails stays pending, with those not reached yet, for the next flush.
        """
        with self._lock:
            folders, self._unsynced = sorted(self._unsynced, key=len, reverse=True), set()
        for i, folder in enumerate(folders):  # deepest first, so a new folder's entry is synced after its contents
            try:
                fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException:
                with self._lock:
                    self._unsynced.update(folders[i:])
                raise

    def remove_stale_temporaries(self, prefixes: Iterable[str], older_than_s: float) -> int:
        """Delete temporary files of local puts under `prefixes` last modified over `older_than_s` ago.

        A put killed between its write and its rename leaves one; listings hide them. Returns how many
        were deleted (always 0 off local disks, where puts leave none).
        """
        if not self._local:
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for prefix in prefixes:
            for folder, _, files in os.walk(self._path(prefix)):
                for file in files:
                    if TMP_MARK not in file:
                        continue
                    path = os.path.join(folder, file)
                    try:
                        if os.stat(path).st_mtime < cutoff:
                            os.unlink(path)
                            removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def list(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix)
        if self._local:
            return with_retries(lambda: self._list_local(base), attempts=self.attempts)

        def find() -> dict[str, int]:
            self.fs.invalidate_cache(base)
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
            out = {}
            for path, info in found.items():
                rel = path[len(self.root) + 1 :] if path.startswith(self.root + "/") else None
                if rel is None:
                    rel = posixpath.relpath("/" + path.lstrip("/"), "/" + self.root.lstrip("/"))
                if TMP_MARK in rel.rsplit("/", 1)[-1] or info.get("type") == "directory":
                    continue
                out[rel] = int(info.get("size") or 0)
            return out

        return with_retries(find, attempts=self.attempts)

    def _list_local(self, base: str) -> dict[str, int]:
        """Files under `base` by name relative to the root, with sizes; every error but absence raises.

        fsspec's `find` leaves out a folder it cannot read (out of file descriptors, EIO, EACCES), so a
        listing that failed read as "no checkpoints" and a resume started from scratch.
        """
        out: dict[str, int] = {}
        folders = [base]
        while folders:
            folder = folders.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue  # nothing stored there yet, or a folder another writer's retention just emptied
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                        continue
                    if TMP_MARK in entry.name or entry.is_dir():  # links to folders are not followed, as os.walk
                        continue
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue  # deleted while listed
                out[os.path.relpath(entry.path, self.root).replace(os.sep, "/")] = size
        return out

    def delete(self, names: Iterable[str]) -> None:
        paths = [self._path(n) for n in names]
        if paths:
            with_retries(lambda: self._rm_each(paths), attempts=self.attempts)

    def discard(self, names: Iterable[str]) -> None:
        """Remove objects that nothing refers to any more, best effort, in as few requests as the backend
        allows (s3fs: one per 1000 keys, against one per key for `delete`).

        A failure may go unreported: S3 answers a batch with an error per key, which s3fs drops. Use
        it only where what stays is harmless and found again by a later listing (unreferenced chunks).
        """
        paths = [self._path(n) for n in names]
        if not paths:
            return

        def rm() -> None:
            # fsspec's rm expands glob patterns: under a root like "s3://sweep/lr[12]" a batch would delete
            # another run's chunk of the same id ("lr1/chunks/...") and keep its own
            if self._local or any(_GLOB_MAGIC.search(p) for p in paths):
                self._rm_each(paths)
                return
            try:
                self.fs.rm(paths)
            except FileNotFoundError:  # a backend that refuses absent names: one by one, skipping them
                self._rm_each(paths)

        with_retries(rm, attempts=self.attempts)

    def _rm_each(self, paths: list[str]) -> None:
        for p in paths:
            try:
                self.fs.rm_file(p)
            except FileNotFoundError:
                pass


_GLOB_MAGIC = re.compile(r"[*?[]")


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _put_local(path: str, parts: Iterable[Buffer], fsync: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}{TMP_MARK}{secrets.token_hex(6)}"
    try:
        with open(tmp, "wb", buffering=0) as fh:
            for part in parts:
                view = memoryview(part).cast("B")
                while view.nbytes:  # 4 MiB writes: several times faster than one huge write, and a later
                    # mmap of the file faults less than after 1 MiB writes (restore ~25% faster, measured)
                    n = fh.write(view[:_WRITE_SLICE])
                    view = view[n:]
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
