"""Where shards are read from: a local folder or an object store (s3://, gs://, http(s)://), behind one interface.

A Storage gives the shard reader what it needs and nothing more: the files directly in its folder with
their sizes, a small file read whole (an index, the manifest), and ranged reads of a large one (the
runs of a shard), several ranges in flight at once. LocalStorage reads a folder with pread;
ObjectStorage reads a bucket prefix or an HTTP folder through obstore (the Python binding of Rust's
object_store crate: one client for S3, GCS and HTTP, with credentials from the standard places).
obstore was chosen by measurement against fsspec (s3fs and fsspec's HTTP) on localhost servers:
ranged reads of a 64 MB object in 4 MB ranges, 861 MB/s against s3fs's 129 MB/s from an S3-API server
(moto), 1,349 against 1,386 MB/s from nginx (benchmarks/store_clients.py, benchmarks/README.md).

Faults: a timeout, a dropped connection, a 429 or a 5xx is retried with exponential backoff (the first
retry is reported once through `warn`); after the retries, or at once for a missing object, a missing
bucket or refused credentials, StoreError says in one line which object and what the store said.
Credentials never appear in a message: only the URL of the object and the store's error code.
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .validate import DatasetScanError, FormatError, read_file

REMOTE = ("s3://", "gs://", "http://", "https://")
# storage_options keys that configure the HTTP client (obstore's ClientConfig); every other key configures the
# store itself (obstore's S3Config / GCSConfig: endpoint, region, ...)
_CLIENT_KEYS = {
    "allow_http",
    "allow_invalid_certificates",
    "connect_timeout",
    "timeout",
    "read_timeout",
    "pool_idle_timeout",
    "proxy_url",
    "http1_only",
    "http2_only",
    "user_agent",
    "default_headers",
}
# mae-fast's own retry policy (obstore's is turned off so that a retry can be seen and reported)
_OWN_KEYS = {"retries", "backoff_s", "max_backoff_s"}
_SECRET = re.compile(r"secret|token|key|password|credential", re.IGNORECASE)
_USERINFO = re.compile(r"//[^/@\s]*@")  # the user:password@ of a URL
MAX_READ = 1 << 30  # a whole-file read (a manifest, an index) larger than this is not one of ours
_POOL: list[ThreadPoolExecutor] = []  # one pool of ranged GETs for every store of the process (made on first use)
_POOL_LOCK = threading.Lock()


class StoreError(OSError):
    """A read or write that failed for good: names the object (its URL) and what the store said."""


class ObjectMissing(StoreError, FileNotFoundError):
    """No object at that name (a 404 from the store)."""


class ObjectChanged(StoreError):
    """The object is no longer the version that was checked (replaced or rewritten since): `size` is its size
    now when that differs from `expected`; None when only its ETag says so."""

    def __init__(self, where: str, size: int | None = None, expected: int | None = None, said: str = ""):
        self.size, self.expected = size, expected
        what = f"{size} bytes, {expected} when it was checked" if size is not None else f"another version ({said})"
        super().__init__(f"{where}: {what}")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE)


def redact(options: Mapping[str, Any]) -> dict[str, Any]:
    """storage_options fit to print: the values of keys that look like credentials replaced by '***'."""
    return {k: "***" if _SECRET.search(k) else v for k, v in options.items()}


class Storage(Protocol):
    url: str  # the folder, as the user named it (printed in messages)

    def where(self, name: str) -> str: ...
    def list(self) -> dict[str, int]: ...
    def head(self, name: str) -> tuple[int, str | None]: ...
    def read(self, name: str, limit: int = ...) -> bytes: ...
    def open(self, name: str) -> BinaryIO: ...
    def read_ranges(
        self, name: str, ranges: list[tuple[int, int]], version: tuple[int, str | None] | None = None
    ) -> list[memoryview]: ...


class LocalStorage:
    """A folder on a file system (local or mounted)."""

    def __init__(self, root: str) -> None:
        self.url = os.path.abspath(os.path.expanduser(root))

    def where(self, name: str) -> str:
        return os.path.join(self.url, name)

    def list(self) -> dict[str, int]:
        """{name: bytes} of the regular files directly in the folder."""
        with os.scandir(self.url) as it:
            return {e.name: e.stat().st_size for e in it if e.is_file()}

    def head(self, name: str) -> tuple[int, str | None]:
        """(bytes, None): a file has no version tag (ShardSet checks a shard's first header instead)."""
        return os.path.getsize(self.where(name)), None

    def read(self, name: str, limit: int = MAX_READ) -> bytes:
        """File `name` whole: a regular file of at most `limit` bytes (validate.read_file)."""
        return read_file(self.where(name), limit)

    def open(self, name: str) -> BinaryIO:
        return open(self.where(name), "rb")

    def read_ranges(
        self, name: str, ranges: list[tuple[int, int]], version: tuple[int, str | None] | None = None
    ) -> list[memoryview]:
        """The bytes [start, end) of each range, in one open. ObjectChanged when the file's size is no longer
        version[0]; StoreError when it ends before a range does."""
        out = []
        with open(self.where(name), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if version is not None and size != version[0]:
                raise ObjectChanged(self.where(name), size, version[0])
            for start, end in ranges:
                buf = bytearray(end - start)
                view, pos = memoryview(buf), 0
                while pos < len(buf):
                    n = os.preadv(f.fileno(), [view[pos : pos + (8 << 20)]], start + pos)
                    if not n:
                        raise StoreError(f"{self.where(name)} ends at byte {start + pos}, {end} were expected")
                    pos += n
                out.append(view)
        return out


class ObjectStorage:
    """A bucket prefix (s3://bucket/prefix, gs://bucket/prefix) or an HTTP folder (http(s)://host/path/).

    Credentials and the endpoint come from the standard places: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (and AWS_PROFILE through boto3, when it is
    installed); Google's application default credentials (GOOGLE_APPLICATION_CREDENTIALS). `options`
    (data.storage_options) adds the rest: client settings (allow_http, timeout, connect_timeout, ...),
    store settings (endpoint, region, ...), and mae-fast's retry policy (retries, backoff_s, max_backoff_s).
    It pickles as its URL and options (ranks each open their own client).
    """

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, warn: Callable[[str], None] | None = None):
        self._url, self.options = url.rstrip("/"), dict(options or {})
        self.url = _USERINFO.sub("//", self._url)  # as printed: never a user:password@ in a message
        self.retries = int(_number(self.url, self.options, "retries", 5, 0, 100))
        self.backoff_s = _number(self.url, self.options, "backoff_s", 0.2, 0, 60)
        self.max_backoff_s = _number(self.url, self.options, "max_backoff_s", 10.0, 0, 3600)
        self.warn, self.warned = warn or _stderr, False
        self._open()

    def _open(self) -> None:
        from obstore.store import from_url  # here: a folder run never needs it

        client = {"timeout": "60s", "connect_timeout": "10s"}  # a stalled read fails (and is retried), never hangs
        endpoint = str(
            self.options.get("endpoint") or (os.environ.get("AWS_ENDPOINT_URL", "") if self.url[:5] == "s3://" else "")
        )
        client["allow_http"] = self._url.startswith("http://") or endpoint.startswith("http://")  # http, as named
        client.update({k: v for k, v in self.options.items() if k in _CLIENT_KEYS})
        config = {k: v for k, v in self.options.items() if k not in _CLIENT_KEYS | _OWN_KEYS}
        kwargs: dict[str, Any] = {}
        if self.url.startswith("s3://") and os.environ.get("AWS_PROFILE"):
            kwargs["credential_provider"] = _boto3_credentials()
        try:
            self.store = from_url(
                self._url + "/", client_options=client, retry_config={"max_retries": 0}, **config, **kwargs
            )
        except Exception as e:  # an unknown option, a malformed URL: the path or its options are wrong (exit 2)
            raise DatasetScanError(f"{self.url}: cannot open the store ({_said(e)})") from None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "store"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def put(self, name: str, data: bytes | str) -> None:
        """Write object `name` from bytes or a local file's path (large files in parts, by obstore)."""
        import obstore

        body = Path(data) if isinstance(data, str) else data
        self._call(self.where(name), lambda: obstore.put(self.store, name, body))

    def list(self) -> dict[str, int]:
        """{name: bytes} of the objects directly under the prefix (not in deeper 'folders')."""
        import obstore

        def listing() -> dict[str, int]:
            found = obstore.list_with_delimiter(self.store)
            return {o["path"].rsplit("/", 1)[-1]: int(o["size"]) for o in found["objects"]}

        return self._call(self.url + "/", listing, listing=True)

    def head(self, name: str) -> tuple[int, str | None]:
        """(bytes, version tag): the object's size and ETag."""
        import obstore

        meta = self._call(self.where(name), lambda: obstore.head(self.store, name))
        return int(meta["size"]), meta.get("e_tag")

    def read(self, name: str, limit: int = MAX_READ) -> bytes:
        """Object `name` whole, at most `limit` bytes (FormatError beyond: its size is known before its body)."""
        import obstore

        def fetch() -> bytes:
            result = obstore.get(self.store, name)
            if result.meta["size"] > limit:
                raise FormatError(self.where(name), "(file)", f"larger than {limit >> 20} MiB")
            return bytes(result.bytes())

        return self._call(self.where(name), fetch)

    def open(self, name: str) -> BinaryIO:
        """The object as a file read front to back (buffered GETs of 8 MB): for a tar read once, whole."""
        import obstore

        reader = self._call(self.where(name), lambda: obstore.open_reader(self.store, name, buffer_size=8 << 20))
        return io.BufferedReader(_Reader(reader, self.where(name)), 8 << 20)

    def read_ranges(
        self, name: str, ranges: list[tuple[int, int]], version: tuple[int, str | None] | None = None
    ) -> list[memoryview]:
        """The bytes [start, end) of each range: one GET per range, up to 8 in flight. With `version` (size, ETag
        from head), ObjectChanged when the object is another version now (If-Match, and its size); StoreError
        when it ends before a range does."""
        import obstore

        options = {"if_match": version[1]} if version and version[1] else {}

        def fetch(r: tuple[int, int]) -> tuple[int, memoryview]:  # the GET and its body: retried together
            result = obstore.get(self.store, name, options={"range": r, **options})
            return result.meta["size"], memoryview(result.bytes())

        def get(r: tuple[int, int]) -> memoryview:
            size, view = self._call(self.where(name), lambda: fetch(r))
            if version is not None and size != version[0]:
                raise ObjectChanged(self.where(name), size, version[0])
            if len(view) != r[1] - r[0]:
                raise StoreError(f"{self.where(name)} ends at byte {r[0] + len(view)}, {r[1]} were expected")
            return view

        return list(_pool().map(get, ranges)) if len(ranges) > 1 else [get(ranges[0])]

    def _call(self, what: str, fn: Callable[[], Any], listing: bool = False) -> Any:
        """fn(), retried with exponential backoff and jitter when the failure is transient."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (StoreError, FormatError):  # ours, already saying what is wrong
                raise
            except Exception as e:
                status, said = _status(e), _said(e)
                if status == 412 or type(e).__name__ == "PreconditionError":
                    raise ObjectChanged(what, said=said) from None
                if not _transient(e, status):
                    missing = (isinstance(e, FileNotFoundError) or status == 404) and "NoSuchBucket" not in str(e)
                    raise (ObjectMissing if missing else StoreError)(_plain(what, e, status, said, listing)) from None
                if attempt == self.retries:
                    raise StoreError(f"{what}: {said} (still failing after {self.retries} retries)") from None
                if not self.warned:
                    self.warned = True
                    self.warn(f"WARNING: {what}: {said}; retrying with backoff (reported once)")
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")


class _Reader(io.RawIOBase):
    """obstore's ReadableFile as a raw binary file (it hands out obstore.Bytes; tarfile wants bytes)."""

    def __init__(self, reader: Any, where: str) -> None:
        self.reader, self.where = reader, where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = memoryview(self.reader.read(len(buffer)))
        except Exception as e:  # the stream failed part-way (not retried: the caller reads the object again)
            raise StoreError(f"{self.where}: {_said(e)}") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.reader.close()
        super().close()


def open_storage(
    path: str, options: Mapping[str, Any] | None = None, warn: Callable[[str], None] | None = None
) -> Storage:
    """The Storage of a folder path or a store URL."""
    return ObjectStorage(path, options, warn) if is_remote(path) else LocalStorage(path)


def _pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(8, thread_name_prefix="store"))
        return _POOL[0]


def _number(url: str, options: dict, key: str, default: float, lo: float, hi: float) -> float:
    """storage_options[key] as a number in [lo, hi]; DatasetScanError naming the key otherwise."""
    value = options.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not lo <= number <= hi:
        raise DatasetScanError(f"{url}: data.storage_options.{key}: must be a number in [{lo}, {hi}], got {value!r}")
    return number


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _boto3_credentials() -> Any:
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise StoreError("AWS_PROFILE is set: reading a profile needs boto3 (pip install boto3)") from None
    return Boto3CredentialProvider(boto3.Session())


def _status(e: Exception) -> int | None:
    """The HTTP status the store answered with, None when there was no answer (a timeout, a reset)."""
    m = re.search(r"status(?: code)?:? (\d{3})", str(e))
    return int(m.group(1)) if m else None


def _said(e: Exception) -> str:
    """What the store said, in a few words: the status and the S3/GCS error code and message when it sent them."""
    text = _USERINFO.sub("//", str(e))
    code = re.search(r"<Code>([^<]{1,80})</Code>", text)
    message = re.search(r"<Message>([^<]{1,200})</Message>", text)
    status = re.search(r"status code: (\d{3}[^:<]{0,40})", text)
    if status or code:
        return " ".join(x.group(1).strip() for x in (status, code) if x) + (f": {message.group(1)}" if message else "")
    for pattern in (r"(operation timed out|timed? ?out)", r"(connection (?:reset|refused|closed)[^,:]{0,40})"):
        if m := re.search(pattern, text, re.IGNORECASE):
            return m.group(1)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]


def _transient(e: Exception, status: int | None) -> bool:
    if isinstance(e, FileNotFoundError | PermissionError | StoreError):
        return False
    if type(e).__module__.startswith("obstore") and type(e).__name__ != "GenericError":
        return False  # not supported, an invalid path, refused: asking again changes nothing
    if status is not None:
        return status == 429 or status >= 500
    return not isinstance(e, ValueError | TypeError)  # no answer: a timeout or a dropped connection


def _plain(what: str, e: Exception, status: int | None, said: str, listing: bool) -> str:
    if "NoSuchBucket" in str(e):
        bucket = what.split("/")[2] if "://" in what else what
        return f"{what}: the bucket {bucket!r} does not exist ({said})"
    if status in (401, 403) or "InvalidAccessKeyId" in said or "SignatureDoesNotMatch" in said:
        return f"{what}: the store refused the credentials ({said}); check AWS_* / GOOGLE_APPLICATION_CREDENTIALS"
    if isinstance(e, FileNotFoundError) or status == 404:
        return f"{what}: no such object ({said})"
    if listing and status in (405, 501):
        return f"{what}: this server cannot list a folder ({said}); give the shards a manifest.json"
    return f"{what}: {said}"
