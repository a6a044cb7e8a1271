"""make-shards: an image folder into WebDataset tar shards, their DALI indexes and a manifest (the layout that
shards.py documents and reads), in a folder or in a store (s3://, gs://).

The scan's checks run first; samples go into shards in a random order (seed 0), each shard is written
under a temporary name and renamed whole (its index last), so a rerun after an interruption keeps the
shards that are complete and writes the rest; the manifest is written last, complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .scan import DatasetScanError, _fingerprint, _list_images, scan_dataset
from .shards import (
    _BLOCK,
    INDEX_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    _check_all,
    _Located,
    _padded,
    index_path,
    load_manifest,
)
from .store import LocalStorage, Storage, is_remote, open_storage
from .validate import WriteError, check_folder, create_new, write_atomic


@dataclass
class MakeShardsReport:
    dst: str
    shards: int
    samples: int
    written: int  # shards written by this run (the others were already complete)
    bytes: int  # of all shards
    classes: list[str] | None
    bad: list[tuple[str, str]]  # source files left out by the scan: (path, reason)


@dataclass
class _Sample:
    rel: str  # source path relative to the source folder
    key: str
    ext: str  # member extension of the image: jpg or png
    label: int | None
    size: int


def _tar_bytes(s: _Sample) -> int:
    return _BLOCK + _padded(s.size) + (2 * _BLOCK if s.label is not None else 0)


def _plan_samples(root: str, files: list[str], labels: list[int], sizes: dict[str, int], flat: bool, seed: int):
    """The samples in the order they go into shards (a permutation drawn from `seed`), with unique keys."""
    used: set[str] = set()
    samples = []
    for i in np.random.default_rng(seed).permutation(len(files)).tolist():
        rel = os.path.relpath(files[i], root)
        stem, ext = os.path.splitext(rel)
        folder, base = os.path.split(stem)
        # a member's key ends at the first dot of its name (wds2idx, webdataset); the index splits at blanks
        key = "".join("_" if c.isspace() else c for c in os.path.join(folder, base.replace(".", "_")))
        unique, n = key, 1
        while unique in used:
            unique, n = f"{key}~{n}", n + 1
        used.add(unique)
        kind = "png" if ext.lower() == ".png" else "jpg"
        samples.append(_Sample(rel, unique, kind, None if flat else labels[i], sizes[rel]))
    return samples


def _cut(samples: list[_Sample], shard_bytes: int) -> list[list[_Sample]]:
    """Consecutive groups of at most shard_bytes of tar (at least one sample each)."""
    shards, current, size = [], [], 0
    for s in samples:
        if current and size + _tar_bytes(s) > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(s)
        size += _tar_bytes(s)
    if current:
        shards.append(current)
    return shards


def _write_shard(src: str, dst: str, name: str, samples: list[_Sample], advance, storage: Storage) -> int:
    """Write shard `name` and its index under temporary names in folder `dst`, then rename them (index last); for a
    store (`storage` is not dst), upload them (index last) and remove the local files. Returns the shard's bytes."""
    tar_path = os.path.join(dst, name)
    idx_path = index_path(dst, name)
    tmp_tar, tmp_idx = os.path.join(dst, f".{name}.tmp"), idx_path + ".tmp"
    lines = []
    try:
        with create_new(tmp_tar) as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for s in samples:
                with open(os.path.join(src, s.rel), "rb") as f:
                    data = f.read()
                members = [(s.ext, data)] + ([("cls", str(s.label).encode())] if s.label is not None else [])
                line = []
                for ext, payload in members:
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # mtime 0: the same bytes every run
                    tf.addfile(info, io.BytesIO(payload))
                    offset = tf.offset - _padded(len(payload))  # the data ends (padded) where tarfile stands now
                    line.append(f"{ext} {offset} {len(payload)} {info.name}")
                lines.append(" ".join(line))
                advance(1)
        with create_new(tmp_idx) as f:
            f.write(f"{INDEX_VERSION} {len(lines)}\n".encode() + "".join(line + "\n" for line in lines).encode())
        os.replace(tmp_tar, tar_path)
        os.replace(tmp_idx, idx_path)  # last: an index beside a tar means the tar is whole
    except OSError as e:  # a full disk, a source file gone: the shard is left out whole, a rerun writes it
        for tmp in (tmp_tar, tmp_idx):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        source = f"; reading {e.filename}" if e.filename else ""
        raise WriteError(
            f"{tar_path}: not written ({e.strerror or e}{source}); run make-shards again to finish"
        ) from None
    size = os.path.getsize(tar_path)
    if storage.url != dst:
        for path in (tar_path, idx_path):  # a StoreError names the object, after the retries
            storage.put(os.path.basename(path), path)
            os.unlink(path)
    return size


def make_shards(
    src: str,
    dst: str,
    *,
    shard_bytes: int = 512 << 20,
    workers: int = 8,
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool = True,
    options: dict | None = None,
) -> MakeShardsReport:
    """Convert an ImageNet-style or flat image folder into WebDataset shards in `dst` (see the module docstring).

    The scan's checks run first (cached as for training): files that fail are reported and never enter
    a shard. Samples go into shards in an order drawn from `seed`, at most shard_bytes of tar each;
    `workers` threads write shards in parallel. Run again after an interruption, it keeps the shards
    already complete and writes the rest; a `dst` holding shards of another source or other settings
    is refused. `dst` may be s3://bucket/prefix or gs://bucket/prefix (`options`: the store's): each shard
    is written into a local temporary folder (under `cache_dir` if given) and uploaded as it is done
    (its index after it), the manifest last, so a store prefix with a manifest is complete.
    """
    if shard_bytes < 1 or workers < 1:
        raise ValueError(f"need shard_bytes >= 1 and workers >= 1, got {shard_bytes}, {workers}")
    if is_remote(dst):  # each shard is written into a local folder, then uploaded; the manifest goes last
        if not dst.startswith(("s3://", "gs://")):
            raise DatasetScanError(f"make-shards DST {dst}: shards can be written to a folder, s3:// or gs://")
        storage: Storage = open_storage(dst, options)
        where = check_folder(cache_dir, "--cache-dir") if cache_dir else None
        folder = tempfile.TemporaryDirectory(prefix="mae-fast-shards-", dir=where)  # removed however it ends
    else:  # before the scan: a destination that cannot be written is known at once
        storage = LocalStorage(check_folder(dst, "make-shards DST"))
        dst = storage.url
        folder = contextlib.nullcontext(dst)
    with folder as work:  # a store: the local folder each shard is written in before it is uploaded
        scanned = scan_dataset(src, cache_dir=cache_dir, num_workers=workers, progress=progress)
        root = scanned.root
        classes, entries, _ = _list_images(root)  # the scan's listing again: its fingerprint and the sizes
        settings = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "source": root,
            "fingerprint": _fingerprint(classes, entries),
            "seed": seed,
            "shard_bytes": shard_bytes,
        }
        flat = scanned.classes == ["."]
        sizes = {rel: size for rel, _, size, _ in entries}
        samples = _plan_samples(root, scanned.files, scanned.labels, sizes, flat, seed)
        groups = _cut(samples, shard_bytes)
        names = [f"shard-{k:06d}.tar" for k in range(len(groups))]

        old = load_manifest(storage)
        if old is not None and {k: old.get(k) for k in settings} != settings:
            differ = ", ".join(k for k in settings if old.get(k) != settings[k])
            raise DatasetScanError(
                f"{dst} holds shards of another source or settings ({differ}); remove it or choose another"
            )
        manifest = {
            **settings,
            "complete": False,
            "classes": None if flat else scanned.classes,
            "num_samples": len(samples),
            "shards": [{"name": n, "samples": len(g)} for n, g in zip(names, groups, strict=True)],
            "bad": [[os.path.relpath(p, root), why] for p, why in scanned.bad],
        }
        if work == dst:
            _write_json(os.path.join(dst, MANIFEST_NAME), manifest)

        at = _Located(storage, manifest, names, [len(g) for g in groups], storage.list())
        checked = _check_all(at, workers)  # the shards already written whole (a rerun): kept
        todo = [k for k, (_, why) in enumerate(checked) if why]
        written = {name: at.sizes.get(name, 0) for name in names}
        with _progress(
            progress, sum(len(groups[k]) for k in todo), f"writing {len(todo)} shards into {dst}"
        ) as advance:
            with ThreadPoolExecutor(workers) as pool:  # I/O bound: reads and writes release the GIL
                futures = [pool.submit(_write_shard, root, work, names[k], groups[k], advance, storage) for k in todo]
                try:
                    for k, f in zip(todo, futures, strict=True):
                        written[names[k]] = f.result()
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # finish the shards being written, start no more
                    raise
        for entry, name in zip(manifest["shards"], names, strict=True):
            entry["bytes"] = written[name]
        manifest["complete"] = True
        if work == dst:
            _write_json(os.path.join(dst, MANIFEST_NAME), manifest)
        else:
            storage.put(MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        return MakeShardsReport(
            dst=dst,
            shards=len(names),
            samples=len(samples),
            written=len(todo),
            bytes=sum(e["bytes"] for e in manifest["shards"]),
            classes=manifest["classes"],
            bad=scanned.bad,
        )


def _write_json(path: str, payload: dict) -> None:
    try:
        write_atomic(path, json.dumps(payload, indent=1).encode())
    except OSError as e:
        raise WriteError(f"{path}: not written ({e.strerror or e}); run make-shards again to finish") from None


@contextlib.contextmanager
def _progress(show: bool, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A Rich progress bar over `total` samples (or nothing); the value advances it, from any thread."""
    if not show or total == 0:
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)
