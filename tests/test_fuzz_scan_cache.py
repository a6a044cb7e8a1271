"""The scan cache (.mae_fast_scan.json), tampered: each a `mae-fast scan` of its own copy of a folder, in one
driver process. A bad cache is never trusted: reported on one `warning:` line naming the file and the field,
rebuilt from the folder (exit 0, the true count), and no file outside the data root is ever opened, not even
one the cache points at."""

from __future__ import annotations

import json
import shutil

import pytest
from fuzz_helpers import opened_under, run_cli

from mae_fast.pipelines.sample_data import make_sample_data
from mae_fast.pipelines.scan import CACHE_NAME, scan_dataset

N = 8
OUTSIDE = "../outside/secret.jpg"  # a valid JPEG beside the root: listed in a cache, it must never be opened


def _set(key, value):
    return lambda p: {**p, key: value}


def _drop(key):
    return lambda p: {k: v for k, v in p.items() if k != key}


def _files(change):
    return lambda p: {**p, "files": change(list(p["files"]))}


JSON_CASES = {  # name: (tampering of the valid payload, the field the warning names)
    "files is not a list": (_set("files", "class_0/img_000000.JPEG"), "files"),
    "no files key": (_drop("files"), "files"),
    "a file outside the root": (_files(lambda f: [OUTSIDE, *f[1:]]), "files[0]"),
    "an absolute path outside the root": (_files(lambda f: ["{outside}/secret.jpg", *f[1:]]), "files[0]"),
    "a path through the root and out": (_files(lambda f: ["class_0/../../outside/secret.jpg", *f[1:]]), "files[0]"),
    "a file the folder does not hold": (_files(lambda f: [*f[:-1], "class_0/not_there.JPEG"]), f"files[{N - 1}]"),
    "a file name that is a number": (_files(lambda f: [7, *f[1:]]), "files[0]"),
    "labels of another length": (lambda p: {**p, "labels": p["labels"][:-1]}, "labels"),
    "a label out of range": (lambda p: {**p, "labels": [99, *p["labels"][1:]]}, "files[0]"),
    "labels as text": (lambda p: {**p, "labels": [str(x) for x in p["labels"]]}, "labels[0]"),
    "a label that is true": (lambda p: {**p, "labels": [True, *p["labels"][1:]]}, "labels[0]"),
    "other classes": (_set("classes", ["class_9", "class_1", "class_2", "class_3"]), "classes"),
    "classes is text": (_set("classes", "class_0"), "classes"),
    "a bad entry of one item": (_set("bad", [["class_0/img_000000.JPEG"]]), "bad[0]"),
    "bad is an object": (_set("bad", {}), "bad"),
    "no labels key": (_drop("labels"), "labels"),
}
RAW_CASES = {  # name: (the file's new bytes from the valid ones, the field)
    "invalid JSON": (lambda b: b"{not json", "(file)"),
    "a list": (lambda b: b"[1, 2, 3]", "(top level)"),
    "binary": (lambda b: bytes(range(256)), "(file)"),
    "an empty file": (lambda b: b"", "(file)"),
    "truncated to a third": (lambda b: b[: len(b) // 3], "(file)"),
    "truncated to a half": (lambda b: b[: len(b) // 2], "(file)"),
    "truncated by one byte": (lambda b: b[:-1], "(file)"),
}
CASES = [*JSON_CASES, *RAW_CASES, "a folder"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per case: its folder, then one driver process scanning all of them."""
    tmp = tmp_path_factory.mktemp("fuzz_scan")
    template = tmp / "template/data"
    make_sample_data(str(template), n=N)
    roots = {}
    for i, name in enumerate([*CASES, "untampered"]):
        root = tmp / f"case{i}" / "data"
        shutil.copytree(template, root)
        (root.parent / "outside").mkdir()
        shutil.copy(template / "class_0/img_000000.JPEG", root.parent / "outside/secret.jpg")
        scan_dataset(str(root), progress=False)  # the valid cache of this copy: its root, its fingerprint
        cache = root / CACHE_NAME
        if name in JSON_CASES:
            tampered = JSON_CASES[name][0](json.loads(cache.read_text()))
            cache.write_text(json.dumps(tampered).replace("{outside}", str(root.parent / "outside")))
        elif name in RAW_CASES:
            cache.write_bytes(RAW_CASES[name][0](cache.read_bytes()))
        elif name == "a folder":
            cache.unlink()
            cache.mkdir()
        roots[name] = root
    results = run_cli([["scan", str(root)] for root in roots.values()], cwd=tmp)
    return {name: (roots[name], r) for name, r in zip(roots, results, strict=True)}


def test_a_valid_cache_is_trusted(runs):
    """The control: untampered, the cache is used and no image is opened (so the cases below are read, not stale)."""
    root, r = runs["untampered"]
    assert r["code"] == 0 and f"{N} images in 4 classes" in r["stdout"] and "warning" not in r["stderr"], r
    assert opened_under(r, root) == [str(root / CACHE_NAME)]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_scan_cache_is_reported_and_rebuilt(runs, case):
    root, r = runs[case]
    assert not r["traceback"] and r["code"] == 0, r
    assert f"{N} images in 4 classes" in r["stdout"]
    assert opened_under(r, root.parent / "outside") == []  # never read, whatever the cache says
    assert len([p for p in opened_under(r, root) if p.endswith(".JPEG")]) >= N  # rebuilt: every image checked
    field = JSON_CASES.get(case, RAW_CASES.get(case, ("", "(file)")))[1]
    warning = [x for x in r["stderr"].splitlines() if x.startswith("warning: ")][0]  # (a folder: also "not written")
    assert f"scan cache {root / CACHE_NAME} is invalid ({field}" in warning and "scanned again" in warning, warning
    if case != "a folder":  # rewritten whole: the next scan trusts it
        rebuilt = json.loads((root / CACHE_NAME).read_text())
        assert len(rebuilt["files"]) == N and rebuilt["root"] == str(root)
        assert all(not f.startswith(("..", "/")) for f in rebuilt["files"])
