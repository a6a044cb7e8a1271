"""Find the images of a dataset folder, check each one cheaply, cache the list.

Two layouts are accepted:

- ImageNet style: ``root/<class>/.../*.JPEG``; each non-hidden subfolder is a
  class (label = index in sorted class names), files found recursively, as
  torchvision's ImageFolder does. Loose files at the top level are ignored.
- Flat: ``root/*.jpg`` and no subfolder holding images; one class named ".".

Only files whose extension is in IMAGE_EXTS are considered (case-insensitive);
other files are ignored. Each candidate is checked by content, not by name: a
JPEG must start with the SOI marker and have an EOI marker near its end, a PNG
must have its signature and an IEND chunk, and PIL must parse the header.
Grayscale and CMYK JPEGs and any PNG mode are valid (the pipelines decode to
RGB). Files that fail go to ScanResult.bad with a reason.

The result is cached as JSON keyed by a fingerprint of (relative path, size,
mtime_ns) of every candidate: listing and stat'ing 1.28M ImageNet files takes
seconds, reading them takes minutes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter

from PIL import Image

from .validate import DatasetScanError, FormatError, inside, need, need_list, read_json, write_atomic

IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png")  # compared lower-case
CACHE_NAME = ".mae_fast_scan.json"
CACHE_VERSION = 1
PROGRESS_MIN_FILES = 2000  # below this a progress bar only flickers
PROCESS_MIN_FILES = 20000  # below this worker processes cost more than they save

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + its fixed CRC
_OTHER_FORMATS = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WebP/RIFF"),
    (b"II*\0", "TIFF"),
    (b"MM\0*", "TIFF"),
)
_TAIL_BYTES = 1024  # EOI may be followed by padding; IEND is the last 12 bytes


@dataclass
class ScanResult:
    root: str  # absolute
    files: list[str]  # absolute paths of the valid images, sorted by (label, path)
    labels: list[int]  # class index of each file
    classes: list[str]  # class folder names, sorted; ["."] for a flat folder
    bad: list[tuple[str, str]]  # (absolute path, reason) of files left out
    from_cache: bool = False
    cache_path: str | None = None  # where the cache was read or written; None if not cached
    notes: list[str] = field(default_factory=list)  # e.g. why the cache was skipped


def scan_dataset(
    root: str,
    cache_dir: str | None = None,
    num_workers: int = 8,
    progress: bool = True,
) -> ScanResult:
    """List and check the images under `root`; reuse the cached result if the folder is unchanged.

    The cache lives in `cache_dir` if given, else in `root` (CACHE_NAME); if
    neither is writable the scan still works, uncached, with a note.
    Raises DatasetScanError (naming the path) when `root` is missing, is not a
    folder, holds no image files, or none of them is valid.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.exists(root):
        raise DatasetScanError(f"dataset path does not exist: {root}")
    if not os.path.isdir(root):
        raise DatasetScanError(f"dataset path is not a directory: {root}")

    classes, entries, skipped = _list_images(root)  # entries: (relpath, label, size, mtime_ns)
    if not entries:
        raise DatasetScanError(
            f"no image files ({', '.join(IMAGE_EXTS)}) found in {root} (expected root/<class>/*.JPEG or root/*.jpg)"
        )
    fingerprint = _fingerprint(classes, entries + [(rel, -1, 0, 0) for rel, _ in skipped])
    cache_path = _cache_path(root, cache_dir)

    notes = []
    try:
        cached = _read_cache(cache_path, root, fingerprint, classes, entries, skipped)
    except FormatError as e:  # reported, rebuilt, never trusted
        cached = None
        notes.append(f"scan cache {e.file} is invalid ({e.field}: {e.problem}); scanned again and rewritten")
    if cached is not None:
        result = _result_from_cache(root, cached)
        result.from_cache, result.cache_path = True, cache_path
        return result

    relpaths = [e[0] for e in entries]
    reasons = _check_all(root, relpaths, num_workers, progress)
    files, labels, bad = [], [], list(skipped)  # unreadable entries are reported with the files that fail
    for (rel, label, _, _), reason in zip(entries, reasons, strict=True):
        if reason is None:
            files.append(rel)
            labels.append(label)
        else:
            bad.append((rel, reason))
    payload = {
        "version": CACHE_VERSION,
        "root": root,
        "fingerprint": fingerprint,
        "classes": classes,
        "files": files,
        "labels": labels,
        "bad": bad,
    }
    result = _result_from_cache(root, payload)
    result.notes.extend(notes)
    if not result.files:
        raise DatasetScanError(
            f"none of the {len(entries)} image files in {root} is a valid JPEG or PNG: " + format_bad(result)
        )
    note = _write_cache(cache_path, payload)
    if note:
        result.notes.append(note)  # the caller shows it (train: a WARNING line; scan: printed)
    else:
        result.cache_path = cache_path
    return result


def format_bad(result: ScanResult, limit: int = 5) -> str:
    """One line such as '2 of 10 files left out: a.jpg (truncated JPEG), b.jpg (not an image)'."""
    if not result.bad:
        return f"0 of {len(result.files)} files left out"
    total = len(result.files) + len(result.bad)
    shown = [f"{os.path.relpath(p, result.root)} ({why})" for p, why in result.bad[:limit]]
    more = len(result.bad) - len(shown)
    tail = f", and {more} more" if more > 0 else ""
    return f"{len(result.bad)} of {total} files left out: " + ", ".join(shown) + tail


# ---------------------------------------------------------------- listing


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTS)


def _walk(folder: str, rel: str, out: list, skipped: list, seen: set) -> None:
    """Append (relpath, size, mtime_ns) of the image files under `folder`, recursively; (relpath, reason) of what
    cannot be read to `skipped`: a broken link, a link loop, a name that is not UTF-8. `seen`: (dev, inode) of
    the folders walked, so a link back up the tree is walked once."""
    with os.scandir(folder) as it:
        subdirs = []
        for entry in it:
            if entry.name.startswith("."):
                continue
            shown = f"{rel}{_printable(entry.name)}"
            if not _is_utf8(entry.name):
                if entry.is_dir() or _is_image_name(entry.name):
                    skipped.append((shown, "its name is not valid UTF-8"))
                continue
            try:
                if entry.is_dir():
                    subdirs.append(entry.name)
                elif _is_image_name(entry.name):
                    if entry.is_file():
                        st = entry.stat()
                        out.append((f"{rel}{entry.name}", st.st_size, st.st_mtime_ns))
                    elif entry.is_symlink():
                        skipped.append((shown, "broken symbolic link"))
            except OSError as e:  # a link loop between files (ELOOP), a name gone since the listing
                if _is_image_name(entry.name):
                    skipped.append((shown, _unreadable(e)))
    for name in subdirs:
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
        except OSError as e:
            skipped.append((f"{rel}{name}/", _unreadable(e)))
            continue
        if (st.st_dev, st.st_ino) in seen:
            skipped.append((f"{rel}{name}/", "symbolic-link loop (a folder already walked)"))
            continue
        seen.add((st.st_dev, st.st_ino))
        _walk(path, f"{rel}{name}/", out, skipped, seen)


def _unreadable(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symbolic-link loop"
    return f"unreadable ({e.strerror or e})"


def _is_dir(entry: os.DirEntry) -> bool:
    """entry.is_dir(), False where it cannot be told (a link loop: the walk reports it as a file would be)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """A file name as text, whatever bytes it holds (undecodable bytes shown as \\xNN)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _list_images(root: str) -> tuple[list[str], list[tuple[str, int, int, int]], list[tuple[str, str]]]:
    """Return (classes, [(relpath, label, size, mtime_ns)] sorted by (label, relpath), [(relpath, reason)] of
    entries that cannot be read).

    Subfolders holding images are classes; if there are none, the folder is flat
    (so a flat folder may also hold, say, a cache folder).
    """
    with os.scandir(root) as it:
        subdirs = sorted(e.name for e in it if not e.name.startswith(".") and _is_dir(e))
    classes: list[str] = []
    entries: list[tuple[str, int, int, int]] = []
    skipped: list[tuple[str, str]] = []
    seen = {(os.stat(root).st_dev, os.stat(root).st_ino)}
    for name in subdirs:
        if not _is_utf8(name):  # a class name must print and go into the cache
            skipped.append((f"{_printable(name)}/", "its name is not valid UTF-8"))
            continue
        found: list[tuple[str, int, int]] = []
        _walk(os.path.join(root, name), f"{name}/", found, skipped, seen)
        if not found:
            continue  # an empty or non-image subfolder is not a class
        label = len(classes)
        classes.append(name)
        entries.extend((rel, label, size, mtime) for rel, size, mtime in sorted(found))
    if classes:
        return classes, entries, skipped
    found, skipped = [], []  # flat: only the top level's files count
    _walk_files(root, found, skipped)
    return ["."], [(rel, 0, size, mtime) for rel, size, mtime in sorted(found)], skipped


def _walk_files(root: str, out: list, skipped: list) -> None:
    """The image files at the top level of a flat folder (subfolders are not walked)."""
    with os.scandir(root) as it:
        for entry in it:
            if entry.name.startswith(".") or not _is_image_name(entry.name):
                continue
            if not _is_utf8(entry.name):
                skipped.append((_printable(entry.name), "its name is not valid UTF-8"))
                continue
            try:
                if entry.is_file():
                    st = entry.stat()
                    out.append((entry.name, st.st_size, st.st_mtime_ns))
                elif entry.is_symlink():
                    skipped.append((entry.name, "broken symbolic link"))
            except OSError as e:  # a link loop between files (ELOOP)
                skipped.append((entry.name, _unreadable(e)))


def _fingerprint(classes: list[str], entries: list[tuple[str, int, int, int]]) -> str:
    """Hash of every (relpath, size, mtime_ns): changes when a file is added, removed or rewritten."""
    h = hashlib.sha256()
    h.update("\0".join(classes).encode())
    for rel, label, size, mtime in entries:
        h.update(f"\0{rel}\0{label}\0{size}\0{mtime}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- checking


def check_image(path: str) -> str | None:
    """Return None if `path` looks like a decodable JPEG or PNG, else the reason it does not.

    Reads the first bytes, the last _TAIL_BYTES and lets PIL parse the header;
    never decodes pixels (PNG verify() reads the chunks and checks their CRCs).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if size == 0:
        return "empty file"
    if head.startswith(_JPEG_SOI):
        kind = "JPEG"
        if _JPEG_EOI not in tail:
            return "truncated JPEG (no end marker)"
    elif head.startswith(_PNG_SIGNATURE):
        kind = "PNG"
        if _PNG_IEND not in tail[-64:]:
            return "truncated PNG (no IEND chunk)"
    else:
        for magic, name in _OTHER_FORMATS:
            if head.startswith(magic):
                return f"unsupported format ({name})"
        return "not a JPEG or PNG" if _looks_binary(head) else "not an image (text)"
    try:
        with Image.open(path) as im:
            if im.format != kind:
                return f"{kind} signature but PIL reads {im.format}"
            w, h = im.size
            if w <= 0 or h <= 0:
                return f"bad {kind} size {w}x{h}"
            if kind == "PNG":
                im.verify()
    except Exception as e:  # PIL raises many types for malformed headers
        return f"bad {kind} header: {type(e).__name__}: {e}"
    return None


def _looks_binary(head: bytes) -> bool:
    return any(b < 9 or 13 < b < 32 for b in head)


def _check_chunk(paths: list[str]) -> list[str | None]:
    return [check_image(p) for p in paths]


def _check_all(root: str, relpaths: list[str], num_workers: int, progress: bool) -> list[str | None]:
    """check_image on every file, in chunks, in parallel, with an optional progress bar.

    PIL's header parsing is Python code that holds the GIL (about 0.1 ms a
    file), so large scans use worker processes (spawned: forking a process that
    may already run DALI or CUDA threads is unsafe); small ones use threads.
    """
    paths = [os.path.join(root, rel) for rel in relpaths]
    chunk = 512
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    workers = max(1, num_workers)
    if workers > 1 and len(paths) >= PROCESS_MIN_FILES:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        pool = ThreadPoolExecutor(workers)
    results: list[str | None] = []
    with pool:
        done = pool.map(_check_chunk, chunks)
        if progress and len(paths) >= PROGRESS_MIN_FILES:
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task(f"checking {len(paths)} images in {root}", total=len(paths))
                for part in done:
                    results.extend(part)
                    bar.advance(task, len(part))
        else:
            for part in done:
                results.extend(part)
    return results


# ---------------------------------------------------------------- cache


def _cache_path(root: str, cache_dir: str | None) -> str:
    if cache_dir is None:
        return os.path.join(root, CACHE_NAME)
    # One cache folder may serve several datasets: name the file after the root.
    tag = hashlib.sha1(root.encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(cache_dir), f"mae_fast_scan-{tag}.json")


def _read_cache(
    path: str,
    root: str,
    fingerprint: str,
    classes: list[str],
    entries: list[tuple[str, int, int, int]],
    skipped: list[tuple[str, str]],
) -> dict | None:
    """The cache at `path` if it describes this very listing, None if there is none or it is stale (another
    version, root or fingerprint). Raises FormatError (file and field) for a cache that is damaged or lists
    anything but the listed files of `root` with their listed labels: such a cache is never trusted."""
    if not os.path.lexists(path):
        return None
    payload = read_json(path)
    need(payload, "version", (int, str, float, type(None)), path)
    if payload["version"] != CACHE_VERSION or payload.get("root") != root or payload.get("fingerprint") != fingerprint:
        return None
    if need_list(payload, "classes", str, path) != classes:
        raise FormatError(path, "classes", "not the class folders of the listing its fingerprint names")
    files, labels = need_list(payload, "files", str, path), need_list(payload, "labels", int, path)
    if len(labels) != len(files):
        raise FormatError(path, "labels", f"{len(labels)} labels for {len(files)} files")
    bad = need_list(payload, "bad", list, path)
    if bad:
        known = {rel for rel, _, _, _ in entries} | {rel for rel, _ in skipped}
        for i, item in enumerate(bad):
            if len(item) != 2 or not all(isinstance(x, str) for x in item) or item[0] not in known:
                raise FormatError(path, f"bad[{i}]", "expected [path of a listed file, reason]")
    # the files are the listing's (every path of which lies inside the root) less the bad ones, in its order:
    # compared whole (ImageNet: 1.28M paths in a fraction of a second), searched only when they differ
    left_out = {item[0] for item in bad}
    kept = [e for e in entries if e[0] not in left_out] if left_out else entries
    if files != list(map(itemgetter(0), kept)) or labels != list(map(itemgetter(1), kept)):
        _first_difference(path, files, labels, {rel: label for rel, label, _, _ in kept})
    return payload


def _first_difference(path: str, files: list[str], labels: list[int], listed: dict[str, int]) -> None:
    """Raise FormatError naming the first entry of the cache that the listing does not hold as it is."""
    for i, (rel, label) in enumerate(zip(files, labels, strict=True)):
        if listed.get(rel) != label:
            inside(rel, path, f"files[{i}]")  # the clearer message first: a path outside the folder
            why = (
                "not an image file of the folder"
                if rel not in listed
                else f"label {label}, the folder says {listed[rel]}"
            )
            raise FormatError(path, f"files[{i}]", f"{rel[:200]!r}: {why}")
    raise FormatError(path, "files", f"{len(files)} files, the folder holds {len(listed)} (less the bad ones)")


def _write_cache(path: str, payload: dict) -> str | None:
    """Write atomically (temp file + rename); return a note instead of raising if not writable."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps(payload).encode())
    except OSError as e:
        return f"scan cache not written ({path}: {e.strerror or e}); give a writable cache folder (data.scan_cache_dir, mae-fast scan --cache-dir) to cache it"
    return None


def _result_from_cache(root: str, payload: dict) -> ScanResult:
    return ScanResult(
        root=root,
        files=[os.path.join(root, rel) for rel in payload["files"]],
        labels=list(payload["labels"]),
        classes=list(payload["classes"]),
        bad=[(os.path.join(root, rel), why) for rel, why in payload["bad"]],
    )
