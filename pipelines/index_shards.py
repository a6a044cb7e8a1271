"""Other tools' WebDataset shards: write the DALI index (wds2idx's format v1.2) that each tar lacks.

A tar written by webdataset's ShardWriter, by the public ImageNet WebDataset conversions, or by plain `tar`
holds samples as consecutive members sharing a key: `<key>.jpg`, `<key>.cls`, `<key>.json`, where the key is
the member's path up to the first dot of its base name (webdataset's rule). index_shards reads each tar's
headers once (a local tar: header by header, seeking over the data; a store object: streamed once) and
writes `<tar name without .tar>.idx`, so dotted names (`train.000000.tar`) get one index each: beside the
tar, or, where the folder cannot be written (a store, a read-only mount), into a local cache folder
(index_cache) where open_shards looks too. A rerun skips the tars whose index is there and matches.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .make_shards import _progress
from .scan import _is_utf8
from .shards import IMAGE_MEMBERS, INDEX_VERSION, ShardScan, _check_all, _locate, index_name, scan_shards
from .store import LocalStorage, Storage, is_remote
from .validate import check_folder, write_atomic


@dataclass
class IndexReport:
    written_to: str  # where the indexes are: the shard folder, or the cache folder
    written: int  # indexes written now (the others were there and matched their tar)
    failed: list[tuple[str, str]]  # (tar, why) that could not be indexed
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("tar:key", why) samples left out of an index
    scan: ShardScan | None = None  # the shards checked again with their new indexes


def index_cache(url: str, cache_dir: str = "") -> str:
    """The local folder for the indexes of the shards at `url` (a store prefix, or a folder that cannot be
    written): `cache_dir` (data.scan_cache_dir) or ~/.cache/mae-fast, then a name made from the URL."""
    base = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "mae-fast")
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://")[-1]).strip("_")[-60:]
    return os.path.join(base, "indexes", f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:12]}")


def index_shards(
    path: str, pattern: str = "*.tar", cache_dir: str = "", workers: int = 8, options: dict | None = None, progress=True
) -> IndexReport:
    """Write the missing (or mismatched) index of every shard at `path` that `pattern` selects, then check them
    all again. Raises DatasetScanError (no shards), DestinationError (the index folder cannot be written)."""
    at = _locate(path, options, pattern, cache_dir)
    folder = at.storage.url
    if is_remote(folder) or not os.access(folder, os.W_OK):
        folder = index_cache(folder, cache_dir)
    folder = check_folder(folder, "index-shards: the index folder")
    todo = [tar for tar, (_, why) in zip(at.tars, _check_all(at, workers), strict=True) if why]
    report = IndexReport(folder, 0, [])
    with _progress(progress, len(todo), f"indexing {len(todo)} shards into {folder}") as advance:
        with ThreadPoolExecutor(max(1, min(workers, len(todo) or 1))) as pool:
            for tar, (why, skipped) in zip(todo, pool.map(lambda t: _write_index(at.storage, t, folder), todo)):
                if why:
                    report.failed.append((tar, why))
                else:
                    report.written += 1
                    report.skipped += [(f"{tar}:{key}", reason) for key, reason in skipped]
                advance(1)
    report.scan = scan_shards(path, workers, options, pattern, cache_dir)
    return report


def _members(storage: Storage, tar: str) -> list[tarfile.TarInfo]:
    """The regular-file members of `tar` in order, from its headers."""
    if isinstance(storage, LocalStorage):
        with tarfile.open(storage.where(tar), "r:") as tf:  # seeks over the data
            return [m for m in tf if m.isfile()]
    with storage.open(tar) as f, tarfile.open(fileobj=f, mode="r|") as tf:  # one streamed read
        return [m for m in tf if m.isfile()]


def _samples(members: list[tarfile.TarInfo]) -> list[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) of each sample: consecutive members with one key (webdataset's grouping)."""
    samples: list[tuple[str, list[tarfile.TarInfo]]] = []
    for m in members:
        directory, base = os.path.split(m.name)
        if base.startswith(".") or "." not in base:
            continue  # no extension: not part of a sample
        key = os.path.join(directory, base.split(".", 1)[0])
        if samples and samples[-1][0] == key:
            samples[-1][1].append(m)
        else:
            samples.append((key, [m]))
    return samples


def _write_index(storage: Storage, tar: str, folder: str) -> tuple[str, list[tuple[str, str]]]:
    """Index `tar` into folder/<name>.idx; returns ("", [(key, why left out)]), or (why it failed, [])."""
    try:
        samples = _samples(_members(storage, tar))
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"not a readable tar ({e})", []
    lines, skipped = [], []
    for key, group in samples:
        exts = [os.path.basename(m.name).split(".", 1)[1] for m in group]
        if any(c.isspace() for m in group for c in m.name):
            skipped.append((key, "a member name holds white space, which the index format cannot hold"))
        elif not all(_is_utf8(m.name) for m in group):
            skipped.append((key.encode(errors="replace").decode(), "a member name is not UTF-8"))
        elif not any(e.lower() in IMAGE_MEMBERS for e in exts):
            skipped.append((key, f"no {'/'.join(IMAGE_MEMBERS)} member (has {', '.join(exts)})"))
        else:
            lines.append(" ".join(f"{e} {m.offset_data} {m.size} {m.name}" for e, m in zip(exts, group, strict=True)))
    if not lines:
        return f"no sample with a {'/'.join(IMAGE_MEMBERS)} member", skipped
    dst = os.path.join(folder, index_name(tar))
    try:
        write_atomic(dst, (f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)).encode())
    except OSError as e:
        return f"{dst}: not written ({e.strerror or e})", []
    return "", skipped
