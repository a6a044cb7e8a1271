"""Odd entries in a data folder, each a `mae-fast scan` (and a make-shards) of its own folder, in one driver process:
a symbolic-link loop between two files (in a class folder, at a flat folder's top), and class folders and files
whose names are not UTF-8. Each is reported by its printable name and left out; the rest is scanned (exit 0)."""

from __future__ import annotations

import os
import shutil

import pytest
from fuzz_helpers import run_cli

from mae_fast.pipelines.sample_data import make_sample_data

CASES = {  # name: (what to add to a copy of an 8-image folder of 4 classes, the report, images left)
    "a file loop in a class": (lambda r: _loop(r / "class_0"), ["class_0/a.jpg (symbolic-link loop)"], 8),
    "a file loop in a flat folder": (lambda r: _loop(r), ["a.jpg (symbolic-link loop)"], 8),
    "a class named in Latin-1": (lambda r: _copy(r, b"caf\xe9/x.jpg"), ["caf\\xe9 (its name is not valid UTF-8)"], 8),
    "a file named in Latin-1": (lambda r: _copy(r, b"class_1/\xe9t\xe9.jpg"), ["class_1/\\xe9t\\xe9.jpg (its name"], 8),
    "a folder named in Latin-1 in a class": (lambda r: _copy(r, b"class_2/\xff/x.jpg"), ["class_2/\\xff"], 8),
}


def _loop(folder):
    os.symlink("b.jpg", folder / "a.jpg")
    os.symlink("a.jpg", folder / "b.jpg")


def _copy(root, rel: bytes):
    dst = os.path.join(os.fsencode(root), rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(os.fsencode(root / "class_3/img_000003.JPEG"), dst)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_folder")
    template = tmp / "template"
    make_sample_data(str(template), n=8)
    roots = {}
    for i, (name, (change, _, _)) in enumerate(CASES.items()):
        root = tmp / f"case{i}"
        if "flat" in name:
            root.mkdir()
            for f in template.glob("*/*.JPEG"):
                shutil.copy(f, root / f.name)
            (root / "class_3").mkdir()  # (no image in it: still a flat folder)
        else:
            shutil.copytree(template, root)
        change(root)
        roots[name] = root
    argvs = [["scan", str(r)] for r in roots.values()]
    argvs += [["make-shards", str(r), str(tmp / f"shards{i}")] for i, r in enumerate(roots.values())]
    results = run_cli(argvs, cwd=tmp)
    return {name: (results[i], results[i + len(CASES)]) for i, name in enumerate(CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_an_odd_entry_is_named_and_left_out(runs, case):
    scan, shards = runs[case]
    _, reports, images = CASES[case]
    assert scan["code"] == 0 and not scan["traceback"] and "Traceback" not in scan["stderr"], scan
    assert f"{images} images" in scan["stdout"]
    for report in reports:
        assert report in scan["stdout"], scan["stdout"]
    scan["stdout"].encode("utf-8")  # printable: no lone surrogate escaped into the output
    assert shards["code"] == 0 and f"{images} samples" in shards["stdout"], shards
