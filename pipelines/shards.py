"""WebDataset tar shards: their index and manifest, read and checked; the shard set; the order of an epoch.

What make_shards.py writes into DST (the layout ShardLoader reads):

    shard-000000.tar   per sample <key>.jpg (or .png): the source file's bytes, not recompressed,
                       and <key>.cls (the class index as ASCII digits) where the source has classes
    shard-000000.idx   DALI's WebDataset index (wds2idx's format v1.2, so fn.readers.webdataset reads
                       the shards too): "v1.2 <samples>", then one line per sample with
                       "<ext> <data offset> <size> <member name>" for each of its members
    manifest.json      samples and bytes per shard, classes, the source's fingerprint, the files the
                       scan left out

Samples are assigned to shards in a random order (seed 0): each shard is a random sample of the
data set, so reading a few whole shards gives well mixed batches. A folder of *.tar with their *.idx
beside them and no manifest (written by other tools, indexed with index_shards.py) is read as well.

The epoch order (epoch_plan) keeps the guarantees of the folder loader's common.epoch_order
(every sample at most once, ranks disjoint and together complete up to a remainder of fewer than
num_shards * batch_size samples, a fresh order per epoch from (seed, epoch), equal whole batches
per rank) while each rank reads whole shards, or long runs of one, sequentially:

    stream   the shards in an order drawn from (seed, epoch), each shard's samples in file order
    rank k   the k-th contiguous run of L * B samples of the stream (the tail of the stream is
             dropped: a few samples, from whichever shards come last in this epoch)
    lanes    the rank's run cut into k = min(64, block_size / 8) contiguous lanes, read round robin
             block_size / k samples of each at a time: a block draws from k far-apart places of the stream
             (as many shards, where the rank's run spans that many), so a batch mixes shards and classes
             even when the shards are class-sorted; reads stay runs (128 samples, ~14 MB of ImageNet, at
             the default buffer of 8192)
    blocks   that read order cut into blocks of `block_size` samples (whole batches); each block is
             read whole (a run per lane), then shuffled, from (seed, epoch, rank)

The order is a pure function of (seed, epoch, rank), so a resume at (epoch, batch) recomputes it.

The shards are read through a store.Storage: a local (or mounted) folder, or an object store prefix
(s3://, gs://, http(s)://). Every byte read goes through ShardSet.read_run / read_sample: one ranged
read per run of samples (a GET in a store), checked against the version of the shard checked at the start.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import hashlib
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .common import batches_per_epoch
from .scan import DatasetScanError
from .store import LocalStorage, ObjectChanged, Storage, StoreError, is_remote, open_storage
from .validate import (
    MAX_JSON_BYTES,
    FormatError,
    inside,
    need,
    need_list,
    parse_json,
)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mae-fast-shards"
MANIFEST_VERSION = 1
INDEX_VERSION = "v1.2"  # the index format of DALI's wds2idx
IMAGE_MEMBERS = ("jpg", "jpeg", "png")  # the member of a sample that holds its image
_BLOCK = 512  # tar block size
LANES = 64  # places of the stream a shuffle block draws from at once, at most (epoch_plan)
MIN_RUN = 8  # samples a lane gives a block, at least: fewer lanes for a small shuffle_buffer (reads stay runs)


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


# ---------------------------------------------------------------- reading a shard set


@dataclass
class ReadStats:
    """What the reads cost: files opened, read calls, bytes (thread-safe counters)."""

    opens: int = 0
    reads: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, opens: int, reads: int, nbytes: int) -> None:
        with self._lock:
            self.opens, self.reads, self.bytes = self.opens + opens, self.reads + reads, self.bytes + nbytes

    def as_dict(self) -> dict:
        mean = self.bytes / self.reads if self.reads else 0.0
        return {"opens": self.opens, "reads": self.reads, "bytes": self.bytes, "bytes_per_read": mean}


class ShardReadError(OSError):
    """A shard cannot be read as its index says: gone, truncated or replaced since the run started."""


@dataclass
class _Index:
    """One shard's index: its samples' keys and image bytes, and the members at its two ends."""

    keys: list[str]
    offsets: np.ndarray  # (n,) int64: where each sample's image starts in the tar
    sizes: np.ndarray  # (n,) int64
    end: int  # the byte after the last member's data
    ends: list[tuple[str, int, int]]  # (member name, data offset, size) of the first and the last member
    labels: np.ndarray  # (n, 2) int64: (data offset, size) of each sample's .cls member; (0, 0) where it has none
    version: tuple[int, str | None] = (0, None)  # the tar's (size, ETag) when _check_shard checked it


MAX_INDEX_BYTES = 256 << 20  # an index this large would describe millions of samples in one shard


def load_index(storage: Storage, name: str, size: int) -> _Index:
    """Parse and check a wds2idx index ("v1.2 N", then per sample: ext offset size name, per member) of `size` bytes.

    Every member's data must start on a tar block after a header (offset >= 512, a multiple of 512), after the
    previous member's data (the members in order); its name must end with its extension. The data's end
    (_Index.end) is checked against the tar's size by _check_shard. Raises FormatError naming the file, the line
    and the field.
    """
    path = storage.where(name)
    try:
        if size > MAX_INDEX_BYTES:
            raise FormatError(path, "(file)", f"larger than {MAX_INDEX_BYTES >> 20} MiB: not an index")
        lines = storage.read(name, MAX_INDEX_BYTES).decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise FormatError(path, "(file)", "not UTF-8 text (binary?)") from None
    except OSError as e:
        raise FormatError(path, "(file)", f"unreadable ({e.strerror or e})") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise FormatError(path, "line 1", f"expected '{INDEX_VERSION} <samples>', got {(lines or [''])[0][:80]!r}")
    count = int(head[1])
    if len(lines) - 1 != count:
        raise FormatError(path, "line 1", f"the header says {count} samples, the index lists {len(lines) - 1}")
    keys, offsets, sizes, end = [], np.empty(count, np.int64), np.empty(count, np.int64), 0
    labels = np.zeros((count, 2), np.int64)
    first = last = None
    for i, line in enumerate(lines[1:]):
        members = _members(path, i + 2, line, end)
        image = next((m for m in members if m[0].lower() in IMAGE_MEMBERS), None)
        if image is None:
            raise FormatError(path, f"line {i + 2}", f"sample {members[0][3]} has no {'/'.join(IMAGE_MEMBERS)} member")
        ext, offsets[i], sizes[i], name = image
        keys.append(name[: -len(ext) - 1])
        label = next((m for m in members if m[0].lower() == "cls"), None)
        if label is not None and label[2] <= 32:  # a class index in ASCII digits
            labels[i] = label[1:3]
        first = first or members[0]
        last = members[-1]
        end = last[1] + last[2]
    ends = [(m[3], m[1], m[2]) for m in (first, last) if m is not None]
    return _Index(keys, offsets, sizes, end, ends, labels)


def _members(path: str, n: int, line: str, end: int) -> list[tuple[str, int, int, str]]:
    """The checked (ext, offset, size, name) of each member on index line `n`; `end`: where the previous data ends."""
    parts = line.split()
    if not parts or len(parts) % 4:
        raise FormatError(path, f"line {n}", f"expected (ext offset size name) per member, got {line[:120]!r}")
    members = []
    for k in range(0, len(parts), 4):
        ext, offset, size, name = parts[k : k + 4]
        where = f"line {n}, member {k // 4 + 1}"
        if not (offset.isdigit() and size.isdigit()):
            raise FormatError(path, where, f"offset and size must be non-negative integers, got {offset!r} {size!r}")
        offset, size = int(offset), int(size)
        if offset % _BLOCK or offset < _padded(end) + _BLOCK:
            raise FormatError(path, f"{where}: offset", f"{offset} is not a tar block after the previous member's data")
        if not name.endswith("." + ext) or len(name) == len(ext) + 1:
            raise FormatError(path, f"{where}: name", f"{name[:120]!r} does not end with its extension .{ext}")
        members.append((ext, offset, size, name))
        end = offset + size
    return members


@dataclass
class ShardSet:
    """The samples of a folder of shards, numbered 0..N-1 shard after shard, in file order."""

    storage: Storage  # the folder or store prefix the shards are in
    tars: list[str]  # shard file names, in manifest (or sorted) order
    counts: np.ndarray  # (S,) samples per shard
    names: list[str]  # (N,) printable sample names "shard-000003.tar:<key>"
    offsets: np.ndarray  # (N,) int64: image data offset in its shard
    sizes: np.ndarray  # (N,) int64: image bytes
    classes: list[str] | None  # None: no class labels (a flat source, or shards from another tool)
    bad: list[tuple[str, str]] = field(default_factory=list)  # source files make_shards left out
    # per shard, as open_shards checked it: (size, ETag or None) and its first member (name, data offset, size);
    # read_run checks them at each read (a store: If-Match; a file: its size and first header), so a shard
    # replaced during a run is caught before it is decoded
    versions: list[tuple[int, str | None]] | None = None
    heads: list[tuple[str, int, int]] | None = None

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # (S + 1,)

    @property
    def root(self) -> str:
        """The folder, or the store URL, as printed in messages."""
        return self.storage.url

    def __len__(self) -> int:
        return len(self.names)

    @property
    def fingerprint(self) -> str:
        """Identifies the layout the epoch order depends on: shard names and sample counts."""
        h = hashlib.sha256()
        for name, n in zip(self.tars, self.counts.tolist(), strict=True):
            h.update(f"{name}\0{n}\0".encode())
        return h.hexdigest()[:16]

    def shard_of(self, sample: int) -> int:
        return int(np.searchsorted(self.starts, sample, side="right")) - 1

    def read_run(self, shard: int, first: int, stop: int, stats: ReadStats | None = None) -> dict[int, np.ndarray]:
        """The images of samples first..stop-1 (all in `shard`): one ranged read of the byte range they span
        (a file: one open and reads of up to 8 MB; a store: one GET), checked against the shard's version.
        Returns {sample: zero-copy view of its bytes}; ShardReadError names a shard gone, changed or unreadable."""
        base = int(self.offsets[first])
        end = int(self.offsets[stop - 1] + self.sizes[stop - 1])
        where, version = self.storage.where(self.tars[shard]), self.versions[shard] if self.versions else None
        # no ETag (a file): the first member's header is read with the run and compared with the index
        head = self.heads[shard] if self.heads and not (version and version[1]) else None
        ranges = [(base, end)] + ([(head[1] - _BLOCK, head[1])] if head else [])
        try:
            views = self.storage.read_ranges(self.tars[shard], ranges, version)
        except ObjectChanged as e:
            now = f"{e.size} bytes, {e.expected} when the run started" if e.size is not None else str(e)
            raise ShardReadError(f"{where} changed during the run: {now} (truncated or replaced)") from None
        except OSError as e:  # gone (deleted, a mount lost), unreadable, a store still failing after its retries
            raise ShardReadError(
                f"{where} cannot be read ({_why(e)}); (mae-fast scan {self.root} checks every shard)"
            ) from None
        if head and not _header_ok(views[1], head[0], head[2]):
            raise ShardReadError(
                f"{where} changed during the run: its first member is no longer {head[0]} "
                f"(replaced by another shard of the same size)"
            )
        if stats is not None:
            stats.add(1, 1, len(views[0]))  # one open, one read of the run (the header check: 512 bytes)
        return {
            i: np.frombuffer(views[0], np.uint8, count=int(self.sizes[i]), offset=int(self.offsets[i]) - base)
            for i in range(first, stop)
        }

    def read_sample(self, sample: int, stats: ReadStats | None = None) -> np.ndarray:
        """One sample's image bytes (a small random read: for the rare sample outside a block)."""
        shard = self.shard_of(sample)
        return self.read_run(shard, sample, sample + 1, stats)[sample]


def _why(e: OSError) -> str:
    """An OSError in a message: a store's says which object and what it said; a file's, its strerror."""
    return str(e) if isinstance(e, StoreError) else e.strerror or str(e)


def is_shard_path(path: str) -> bool:
    """Does `path` name shards: a manifest file, or a folder holding a manifest or *.tar files?"""
    path = os.path.expanduser(path)
    if is_remote(path):
        return True
    if os.path.isfile(path):
        return path.endswith(".json")
    if not os.path.isdir(path):
        return False
    with os.scandir(path) as it:
        return any(e.name == MANIFEST_NAME or (e.name.endswith(".tar") and e.is_file()) for e in it)


def load_manifest(storage: Storage, name: str = MANIFEST_NAME) -> dict | None:
    """The checked manifest `name` in `storage`, None if there is none."""
    file = storage.where(name)
    try:
        manifest = parse_json(storage.read(name, MAX_JSON_BYTES), file)
    except FileNotFoundError:
        return None
    except OSError as e:  # a folder, unreadable; a store still failing after its retries
        raise FormatError(file, "(file)", f"unreadable ({_why(e)})") from None
    if need(manifest, "format", (str, type(None)), file) != MANIFEST_FORMAT:
        raise FormatError(file, "format", f"not a {MANIFEST_FORMAT} manifest")
    if need(manifest, "version", int, file) != MANIFEST_VERSION:
        raise FormatError(file, "version", f"{manifest['version']}; this mae-fast reads version {MANIFEST_VERSION}")
    _check_manifest(manifest, file)
    return manifest


def _check_manifest(manifest: dict, file: str) -> None:
    """The fields a reader uses: complete, shards (plain *.tar names, each once, with samples >= 1 and bytes >= 0),
    num_samples (their sum), classes (null or distinct names), bad ([path inside the source, reason] pairs)."""
    need(manifest, "complete", bool, file)
    shards = need_list(manifest, "shards", dict, file)
    if not shards:
        raise FormatError(file, "shards", "empty: no shard listed")
    names = set()
    for i, shard in enumerate(shards):
        name = need(shard, "name", str, file, f"shards[{i}].")
        if os.path.basename(name) != name or not name.endswith(".tar") or name.startswith(".") or name in names:
            raise FormatError(
                file, f"shards[{i}].name", f"{name[:120]!r} is not a shard file name (or is listed twice)"
            )
        names.add(name)
        if need(shard, "samples", int, file, f"shards[{i}].") < 1:
            raise FormatError(file, f"shards[{i}].samples", f"must be >= 1, got {shard['samples']}")
        if "bytes" in shard and need(shard, "bytes", int, file, f"shards[{i}].") < 0:
            raise FormatError(file, f"shards[{i}].bytes", f"must be >= 0, got {shard['bytes']}")
    total = sum(s["samples"] for s in shards)
    if "num_samples" in manifest and need(manifest, "num_samples", int, file) != total:
        raise FormatError(file, "num_samples", f"{manifest['num_samples']}, the shards hold {total}")
    classes = need(manifest, "classes", (list, type(None)), file)
    if classes is not None:
        need_list(manifest, "classes", str, file)
        if not classes or len(set(classes)) != len(classes):
            raise FormatError(file, "classes", "must be null or distinct class names")
    for i, item in enumerate(need_list(manifest, "bad", list, file) if "bad" in manifest else []):
        if len(item) != 2 or not all(isinstance(x, str) for x in item):
            raise FormatError(file, f"bad[{i}]", "expected [path, reason]")
        inside(item[0], file, f"bad[{i}]")


@dataclass
class _Located:
    """A shard folder or store prefix: its storage, manifest, shard names, the counts the manifest expects,
    {name: bytes} of its files (None where the store cannot list: an HTTP server; sizes are then asked), and
    the local folders that may hold indexes it lacks (index-shards' cache)."""

    storage: Storage
    manifest: dict | None
    tars: list[str]
    counts: list[int] | None
    sizes: dict[str, int] | None
    caches: list[Storage] = field(default_factory=list)


SPLITS = {"train", "val", "valid", "validation", "test", "eval"}  # words that name a split in a shard name


def _locate(path: str, options: dict | None = None, pattern: str = "*.tar", cache_dir: str = "") -> _Located:
    """The shards of a folder, a manifest file, or a store prefix (s3://, gs://, http(s)://) that `pattern`
    (data.shards) selects. A folder whose tar names hold several split words (train, val, test, ...) is refused
    while the pattern is the default: it would train on every split."""
    from .index_shards import index_cache

    path = os.path.expanduser(path)
    name = MANIFEST_NAME
    if is_remote(path):
        if path.endswith(".json"):
            path, name = path.rsplit("/", 1)
        storage = open_storage(path, options)
    else:
        if not os.path.exists(path):
            raise DatasetScanError(f"shard path does not exist: {path}")
        if os.path.isfile(path):
            path, name = os.path.split(os.path.abspath(path))
        storage = LocalStorage(path)
    manifest = load_manifest(storage, name)
    try:
        sizes = storage.list()
    except OSError as e:
        if manifest is None or "cannot list" not in str(e):
            raise DatasetScanError(f"{storage.url}: cannot list the shards ({_why(e)})") from None
        sizes = None  # an HTTP server: the manifest names the shards, each is asked its size
    cache = index_cache(storage.url, cache_dir)
    caches = [LocalStorage(cache)] if os.path.isdir(cache) else []
    if manifest is not None:
        if not manifest.get("complete"):
            raise DatasetScanError(f"{storage.url}: make-shards did not finish; run it again to complete the shards")
        shards = [s for s in manifest["shards"] if fnmatch.fnmatchcase(s["name"], pattern)]
        if not shards:
            raise DatasetScanError(f"{storage.where(name)}: no shard matches data.shards {pattern!r}")
        tars, counts = [s["name"] for s in shards], [int(s["samples"]) for s in shards]
        return _Located(storage, manifest, tars, counts, sizes, caches)
    tars = sorted(n for n in sizes or {} if fnmatch.fnmatchcase(n, pattern) and not n.startswith("."))
    if not tars:
        raise DatasetScanError(f"no shards ({pattern}) and no {MANIFEST_NAME} in {storage.url}")
    splits = collections.Counter(w for t in tars for w in set(re.split(r"[^a-z]+", t.lower())) & SPLITS)
    if len(splits) > 1 and pattern == "*.tar":
        found = ", ".join(f"{n} named '{w}'" for w, n in sorted(splits.items()))
        example = next(t for t in tars if "train" in t.lower()) if "train" in splits else tars[0]
        raise DatasetScanError(
            f"{storage.url} holds the shards of several splits ({found}); choose one with data.shards (--shards "
            f"for scan and index-shards), e.g. data.shards: '{re.sub(r'[0-9]+(?=[^0-9]*$)', '*', example)}'"
        )
    return _Located(storage, None, tars, None, sizes, caches)


def index_name(tar: str) -> str:
    return tar[: -len(".tar")] + ".idx" if tar.endswith(".tar") else tar + ".idx"


def index_path(root: str, tar: str) -> str:
    return os.path.join(root, index_name(tar))


def _indexes(at: _Located, tar: str) -> list[tuple[Storage, int]]:
    """Where the index of `tar` is, with its size: beside it, then in index-shards' cache (each that exists)."""
    idx, found = index_name(tar), []
    if at.sizes is None:  # a store that cannot list: asked
        with contextlib.suppress(FileNotFoundError):
            found.append((at.storage, at.storage.head(idx)[0]))
    elif idx in at.sizes:
        found.append((at.storage, at.sizes[idx]))
    for cache in at.caches:
        if os.path.isfile(cache.where(idx)):
            found.append((cache, os.path.getsize(cache.where(idx))))
    return found


def _check_shard(at: _Located, tar: str, expected: int | None) -> tuple[_Index | None, str | None]:
    """(index, None) if shard `tar` is whole and matches its index, else (index or None, what is wrong).

    Cheap: its size (and, in a store, its ETag), the index, and two 512-byte reads. The tar must hold every byte
    its index names, and the headers of its first and last member must give the name and size the index gives.
    An index beside the tar is tried first, then one in index-shards' cache.
    """
    storage, idx = at.storage, index_name(tar)
    try:
        if at.sizes is not None and tar not in at.sizes:
            return None, "missing"
        size, tag = (at.sizes[tar], None) if at.sizes is not None and not is_remote(storage.url) else storage.head(tar)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable ({e})"
    found = _indexes(at, tar)
    if not found:
        return None, f"no index {idx} (write the indexes with: mae-fast index-shards {storage.url})"
    problem: tuple[_Index | None, str | None] = (None, None)
    for where, index_size in found:
        try:
            index = load_index(where, idx, index_size)
        except FormatError as e:
            got = None, f"bad index {idx}: {e.field}: {e.problem} (rebuild it: mae-fast index-shards {storage.url})"
        else:
            got = _matches(storage, tar, index, (size, tag), expected)
        if got[1] is None:
            return got
        problem = problem if problem[1] else got
    return problem


def _matches(
    storage: Storage, tar: str, index: _Index, version: tuple[int, str | None], expected: int | None
) -> tuple[_Index, str | None]:
    """(index, None) if the tar (of `version`) holds what `index` says, else (index, what is wrong)."""
    if expected is not None and len(index.keys) != expected:
        return index, f"the manifest says {expected} samples, the index {len(index.keys)}"
    if not index.keys:
        return index, "no samples"
    index.version = version
    if version[0] < index.end:
        return index, f"truncated: {version[0]} bytes, its index needs {index.end}"
    try:
        headers = storage.read_ranges(tar, [(offset - _BLOCK, offset) for _, offset, _ in index.ends], version)
    except OSError as e:
        return index, f"unreadable ({_why(e)})"
    for header, (name, offset, nbytes) in zip(headers, index.ends, strict=True):
        if not _header_ok(header, name, nbytes):
            return index, f"does not match its index: no tar header for {name} ({nbytes} bytes) at {offset - _BLOCK}"
    return index, None


def _header_ok(header: bytes | memoryview, name: str, nbytes: int) -> bool:
    """Is `header` (512 bytes) the tar header of member `name` with `nbytes` of data?"""
    header = bytes(header)
    got = header[:100].split(b"\0")[0].decode(errors="replace")
    try:
        got_size = int(header[124:136].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        got_size = -1
    return (
        header[257:262] == b"ustar"
        and got_size == nbytes
        and bool(got)
        and (name.startswith(got) or name.endswith(got))
    )


@dataclass
class ShardScan:
    """What `mae-fast scan` reports for a shard folder."""

    root: str
    tars: list[str]
    samples: int  # in the shards that are fine
    classes: list[str] | None
    problems: list[tuple[str, str]]  # (shard name, what is wrong)
    bad: list[tuple[str, str]]  # source files make_shards left out (relative path, reason)
    labelled: dict[str, list[int]] = field(default_factory=dict)  # shard -> the .cls of up to 8 samples spread over it

    def class_sorted(self) -> bool:
        """Do the shards look class-sorted: most hold one or two of the classes seen, and there are more?"""
        per_shard = [len(set(v)) for v in self.labelled.values() if v]
        seen = {c for v in self.labelled.values() for c in v}
        return bool(per_shard) and len(seen) > 2 and float(np.median(per_shard)) <= 2


def _check_all(at: _Located, workers: int = 16) -> list:
    expected = at.counts or [None] * len(at.tars)
    with ThreadPoolExecutor(max(1, min(workers, len(at.tars)))) as pool:  # threads: hide a network's latency
        return list(pool.map(lambda a: _check_shard(at, *a), zip(at.tars, expected, strict=True)))


def scan_shards(
    path: str, workers: int = 16, options: dict | None = None, pattern: str = "*.tar", cache_dir: str = ""
) -> ShardScan:
    """Count the samples from the index files and check each shard against its index (seconds for ImageNet)."""
    at = _locate(path, options, pattern, cache_dir)
    checked = _check_all(at, workers)
    problems = [(tar, why) for tar, (_, why) in zip(at.tars, checked, strict=True) if why]
    samples = sum(len(index.keys) for index, why in checked if index is not None and not why)
    manifest = at.manifest
    classes = manifest.get("classes") if manifest else None
    bad = [tuple(b) for b in manifest.get("bad", [])] if manifest else []
    fine = [(tar, index) for tar, (index, why) in zip(at.tars, checked, strict=True) if not why]
    with ThreadPoolExecutor(max(1, min(workers, len(fine) or 1))) as pool:
        labels = dict(zip([t for t, _ in fine], pool.map(lambda a: _labels(at.storage, *a), fine), strict=True))
    return ShardScan(at.storage.url, at.tars, samples, classes, problems, bad, labels)


def _labels(storage: Storage, tar: str, index: _Index, n: int = 8) -> list[int]:
    """The class indexes (.cls members) of up to n samples spread over a shard: one small ranged read each."""
    picks = [i for i in np.linspace(0, len(index.keys) - 1, n).astype(int).tolist() if index.labels[i, 1]]
    ranges = [(int(index.labels[i, 0]), int(index.labels[i].sum())) for i in dict.fromkeys(picks)]
    try:
        texts = storage.read_ranges(tar, ranges, index.version) if ranges else []
    except OSError:
        return []
    return [int(t) for t in (bytes(v).strip() for v in texts) if t.isdigit()]


def format_problems(problems: list[tuple[str, str]], total: int, limit: int = 5) -> str:
    shown = ", ".join(f"{tar} ({why})" for tar, why in problems[:limit])
    more = f", and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} of {total} shards unusable: {shown}{more}"


def open_shards(
    path: str, workers: int = 16, options: dict | None = None, pattern: str = "*.tar", cache_dir: str = ""
) -> ShardSet:
    """Read the indexes of a shard folder, manifest or store prefix after checking every shard.

    Raises DatasetScanError naming each missing, truncated or mismatched shard, before any model is built.
    `options`: the store's (data.storage_options); `pattern`: the tars to read (data.shards); `cache_dir`: where
    index-shards' cache is (data.scan_cache_dir; default ~/.cache/mae-fast).
    """
    at = _locate(path, options, pattern, cache_dir)
    checked = _check_all(at, workers)
    problems = [(tar, why) for tar, (_, why) in zip(at.tars, checked, strict=True) if why]
    if problems:
        raise DatasetScanError(f"{at.storage.url}: " + format_problems(problems, len(at.tars)))
    indexes, manifest = [index for index, _ in checked], at.manifest
    names = [f"{tar}:{key}" for tar, index in zip(at.tars, indexes, strict=True) for key in index.keys]
    return ShardSet(
        storage=at.storage,
        tars=at.tars,
        counts=np.array([len(index.keys) for index in indexes], np.int64),
        names=names,
        offsets=np.concatenate([index.offsets for index in indexes]),
        sizes=np.concatenate([index.sizes for index in indexes]),
        classes=manifest.get("classes") if manifest else None,
        bad=[tuple(b) for b in manifest.get("bad", [])] if manifest else [],
        versions=[index.version for index in indexes],
        heads=[index.ends[0] for index in indexes],
    )


# ---------------------------------------------------------------- the epoch order


@dataclass
class EpochPlan:
    """One rank's epoch: `order` (L, B) sample ids in batch order; `blocks[j]` the samples of block j
    in stream order (runs of consecutive samples of one shard: how they are read); batch b lies in
    block b // batches_per_block."""

    order: np.ndarray
    blocks: list[np.ndarray]
    batches_per_block: int


def epoch_plan(
    counts: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shard_id: int,
    num_shards: int,
    block_size: int,
) -> EpochPlan:
    """The order of rank `shard_id` in `epoch` over shards of `counts` samples (see the module docstring).

    block_size: samples shuffled together, a multiple of batch_size; the reader holds about two
    blocks of encoded images in memory. All ranks must pass the same seed and block_size.
    """
    if block_size < batch_size or block_size % batch_size:
        raise ValueError(f"block_size must be a positive multiple of batch_size {batch_size}, got {block_size}")
    counts = np.asarray(counts, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    L = batches_per_epoch(int(counts.sum()), batch_size, num_shards)
    tar_order = np.random.default_rng((seed, epoch)).permutation(len(counts))
    stream = np.concatenate([np.arange(starts[t], starts[t] + counts[t]) for t in tar_order])
    per_rank = L * batch_size
    run = stream[shard_id * per_rank : (shard_id + 1) * per_rank]
    # the rank's run as LANES contiguous lanes, read round robin a chunk of each at a time: a block holds LANES
    # runs from far-apart places of the stream (other shards), so a batch mixes shards, and reads stay long
    k = max(1, min(LANES, block_size // MIN_RUN, len(run)))
    chunk = block_size // k
    lanes = np.array_split(run, k)
    longest = max((len(lane) for lane in lanes), default=0)
    read = [lane[i : i + chunk] for i in range(0, longest, chunk) for lane in lanes]
    run = np.concatenate(read) if read else run
    blocks = [run[i : i + block_size] for i in range(0, per_rank, block_size)]
    rng = np.random.default_rng((seed, epoch, shard_id))
    order = np.concatenate([rng.permutation(b) for b in blocks]) if blocks else run
    return EpochPlan(order.reshape(L, batch_size), blocks, block_size // batch_size)


def runs(samples: np.ndarray, starts: np.ndarray) -> list[tuple[int, int, int]]:
    """(shard, first, stop) of each run of consecutive samples of one shard in `samples` (stream order)."""
    if len(samples) == 0:
        return []
    shard = np.searchsorted(starts, samples, side="right") - 1
    cut = np.flatnonzero((np.diff(samples) != 1) | (np.diff(shard) != 0)) + 1
    edges = np.concatenate([[0], cut, [len(samples)]])
    return [(int(shard[a]), int(samples[a]), int(samples[b - 1]) + 1) for a, b in zip(edges[:-1], edges[1:])]
