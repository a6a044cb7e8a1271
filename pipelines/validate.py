"""What the validating readers of mae-fast's files share, and the checks of a destination before any work.

Each on-disk format has one reader that checks every field it uses (the scan cache: scan._read_cache; a shard
index: shards.load_index; the manifest: shards.load_manifest) and raises FormatError naming the file and the
field. Every local file is read through read_file (a regular file, at most a bound: never a FIFO that blocks or a
device that never ends), and every small file written through write_atomic. A destination (a folder or a file to write) is checked with a real test file before anything is read or
computed, so a bad one is known at once (DestinationError); a write that fails part-way (a full disk) is a
WriteError naming the path. None of these is ever a traceback: the command line prints their message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from typing import Any, BinaryIO

MAX_JSON_BYTES = 1 << 30  # a manifest or scan cache larger than this is not one (ImageNet's cache: ~60 MB)


class DatasetScanError(Exception):
    """The dataset folder is missing, not a folder, or holds no usable image."""


class FormatError(DatasetScanError):
    """A file mae-fast reads (scan cache, shard index, manifest) is damaged or not what it claims: names the file
    and the field."""

    def __init__(self, file: str, field: str, problem: str):
        super().__init__(f"{file}: {field}: {problem}")
        self.file, self.field, self.problem = file, field, problem


class DestinationError(Exception):
    """A path to be written is not a writable folder (or file name): found before any work (exit 2)."""


class WriteError(Exception):
    """A write failed part-way (a full disk, a file system gone read-only): names the path (exit 1)."""


# ---------------------------------------------------------------- JSON fields


def read_file(path: str, limit: int) -> bytes:
    """The bytes of the regular file `path` (a link to one is followed), at most `limit`: OSError for anything else
    (a FIFO is opened without blocking and refused, a device or a folder refused), FormatError beyond `limit`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if info.st_size > limit:
            raise FormatError(path, "(file)", f"larger than {limit >> 20} MiB")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while read
        raise FormatError(path, "(file)", f"larger than {limit >> 20} MiB")
    return data


def create_new(path: str) -> BinaryIO:
    """A new file at `path` for writing: whatever was there (a file left by a killed run, or a planted symbolic
    link, which open() would follow) is removed first, and O_EXCL | O_NOFOLLOW refuse one that comes back."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), "wb")


def write_atomic(path: str, data: bytes) -> None:
    """`data` into `path` through a new temporary file beside it (create_new), renamed over `path` when whole; on
    an error (a full disk) the temporary file is removed and the OSError raised."""
    tmp = f"{path}.tmp"
    try:
        with create_new(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Any:
    """The JSON value in `path`; FormatError for a file that is not one (a folder, empty, binary, not JSON)."""
    try:
        data = read_file(path, MAX_JSON_BYTES)
    except OSError as e:
        raise FormatError(path, "(file)", f"unreadable ({e.strerror or e})") from None
    return parse_json(data, path)


def parse_json(data: bytes, path: str) -> Any:
    """The JSON value in `data` (the bytes of file `path`, local or in a store); FormatError if it is not one."""
    if len(data) > MAX_JSON_BYTES:
        raise FormatError(path, "(file)", f"larger than {MAX_JSON_BYTES >> 20} MiB")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise FormatError(path, "(file)", "not UTF-8 text (binary?)") from None
    except ValueError as e:  # json.JSONDecodeError
        raise FormatError(path, "(file)", f"not JSON ({e})" if data else "empty file") from None


def need(obj: Any, key: str, kind: type | tuple[type, ...], file: str, where: str = "") -> Any:
    """obj[key], which must be a `kind` (a bool is not an int); FormatError naming `where + key` otherwise."""
    name = f"{where}{key}"
    if not isinstance(obj, dict):
        raise FormatError(file, where.rstrip(".") or "(top level)", f"expected an object, got {_kind(obj)}")
    if key not in obj:
        raise FormatError(file, name, "missing")
    value = obj[key]
    if not _is(value, kind):
        raise FormatError(file, name, f"expected {_names(kind)}, got {_kind(value)}")
    return value


def need_list(obj: Any, key: str, kind: type | tuple[type, ...], file: str, where: str = "") -> list:
    """obj[key], a list of `kind` items."""
    items = need(obj, key, list, file, where)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if all(_is_type(t, kinds) for t in set(map(type, items))):  # the item types, at C speed (1M+ paths)
        return items
    i = next(i for i, x in enumerate(items) if not _is_type(type(x), kinds))
    raise FormatError(file, f"{where}{key}[{i}]", f"expected {_names(kind)}, got {_kind(items[i])}")


def _is_type(t: type, kinds: tuple[type, ...]) -> bool:
    return issubclass(t, kinds) and (t is not bool or bool in kinds)  # a bool is not an int


def inside(rel: str, file: str, name: str) -> str:
    """`rel` as a path relative to a root that stays under it (no absolute path, no '..', no NUL byte)."""
    parts = rel.replace("\\", "/").split("/")
    if not rel or "\0" in rel or os.path.isabs(rel) or ".." in parts:
        raise FormatError(file, name, f"{rel[:200]!r} is not a path inside the folder")
    return rel


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {int: "an integer", str: "a string", list: "a list", dict: "an object", bool: "true/false"}
    return " or ".join(words.get(k, "null" if k is type(None) else k.__name__) for k in kinds)


def _kind(value: Any) -> str:
    text = json.dumps(value)[:60] if isinstance(value, (str, int, float, bool)) else type(value).__name__
    return {type(None).__name__: "null", "dict": "an object", "list": "a list"}.get(text, text)


# ---------------------------------------------------------------- destinations


def check_folder(path: str, what: str) -> str:
    """Make sure `path` is a folder this process can write (created if missing, a test file written and removed);
    returns it absolute. DestinationError naming `what` (an argument or config key) and the path otherwise."""
    path = os.path.abspath(os.path.expanduser(path))
    problem = _folder_problem(path)
    if problem:
        raise DestinationError(f"{what} {path}: {problem}")
    return path


def check_file(path: str, what: str) -> str:
    """Make sure the file `path` can be written: not a folder, in a folder check_folder accepts; returns it absolute."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise DestinationError(f"{what} {path}: it is a folder; give a file name")
    problem = _folder_problem(os.path.dirname(path))
    if problem:
        raise DestinationError(f"{what} {path}: cannot write into {os.path.dirname(path)}: {problem}")
    return path


def _folder_problem(path: str) -> str | None:
    """Why `path` is not a writable folder (None: it is one, now created): it is a file, or a real test file
    cannot be written there (no permission, a read-only or full file system, a path under a file)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "it is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
        fd, test = tempfile.mkstemp(prefix=".mae-fast-write-test.", dir=path)
        try:
            os.write(fd, b"mae-fast")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(test)
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return None
