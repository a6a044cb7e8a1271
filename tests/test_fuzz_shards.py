"""A shard folder's files, tampered: the index (shard-000000.idx), its tar, and manifest.json. Each case is a
`mae-fast scan` of its own copy of the folder, all in one driver process, and a few are a `mae-fast train` too:
each ends with one `error:` line naming the file and the field (or the shard and what is wrong), exit 2, no
traceback, and no file outside the shard folder opened."""

from __future__ import annotations

import json
import shutil

import pytest
from fuzz_helpers import ROOT, assert_one_error, run_cli

from mae_fast.pipelines.make_shards import make_shards
from mae_fast.pipelines.sample_data import make_sample_data


def _line(n, change):
    """Change line n (1: the header) of the index, given as its list of fields."""

    def tamper(text):
        lines = text.splitlines()
        k = n - 1 if n > 0 else n  # -1: the last line
        lines[k] = " ".join(change(lines[k].split()))
        return "\n".join(lines) + "\n"

    return tamper


def _put(k, value):
    return lambda f: [*f[:k], value, *f[k + 1 :]]


IDX = "shard-000000.idx"
INDEX_CASES = {  # name: (the index's new text from the valid one, what the error names)
    "a negative first offset": (_line(2, _put(1, "-512")), "line 2, member 1"),
    "a huge member size": (_line(-1, _put(6, str(10**15))), "truncated"),
    "a negative size mid-index": (_line(3, _put(2, "-5")), "line 3, member 1"),
    "an offset off the tar blocks": (_line(3, lambda f: _put(1, str(int(f[1]) + 1))(f)), "line 3, member 1: offset"),
    "members out of order": (lambda t: "\n".join([t.splitlines()[i] for i in (0, 2, 1, 3)]) + "\n", "line 3"),
    "an offset inside the previous member": (_line(3, _put(1, "1024")), "line 3, member 1: offset"),
    "a header that miscounts": (_line(1, _put(1, "99")), "line 1"),
    "another version": (_line(1, _put(0, "v0.9")), "line 1"),
    "a text offset": (_line(2, _put(1, "abc")), "line 2, member 1"),
    "a name without its extension": (_line(2, _put(3, "img.png")), "line 2, member 1: name"),
    "no image member": (_line(2, lambda f: ["txt", f[1], f[2], "a.txt", *f[4:]]), "has no jpg"),
    "three fields": (_line(2, lambda f: f[:3]), "line 2"),
    "binary": (lambda t: bytes(range(256)).decode("latin-1"), "(file)"),
    "empty": (lambda t: "", "line 1"),
    "truncated to a third": (lambda t: t[: len(t) // 3], "line 1"),
    "truncated to a half": (lambda t: t[: len(t) // 2], "line 1"),
    "truncated by 3 bytes": (lambda t: t[:-3], "name"),
}
TAR_CASES = {  # name: (the tar's new bytes from the valid ones, what the error names)
    "tar truncated to a third": (lambda b: b[: len(b) // 3], "truncated"),
    "tar truncated to a half": (lambda b: b[: len(b) // 2], "truncated"),
    "tar without its last data byte": (None, "truncated"),  # cut at the index's end - 1
    "tar replaced by another shard of its size": (None, "does not match its index"),
    "tar emptied": (lambda b: b"", "truncated"),
}
MANIFEST = "manifest.json"


def _m(change):
    return lambda m: change(json.loads(json.dumps(m)))


def _shard(k, change):
    def tamper(m):
        change(m["shards"][k])
        return m

    return _m(tamper)


MANIFEST_CASES = {  # name: (the manifest's new value or bytes, the field the error names)
    "manifest: invalid JSON": (b'{"format": ', "(file)"),
    "manifest: a list": (b"[]", "(top level)"),
    "manifest: binary": (bytes(range(256)), "(file)"),
    "manifest: an empty file": (b"", "(file)"),
    "manifest: no shards key": (_m(lambda m: {k: v for k, v in m.items() if k != "shards"}), "shards"),
    "manifest: a shard without a name": (_shard(0, lambda s: s.pop("name")), "shards[0].name"),
    "manifest: samples as text": (_shard(1, lambda s: s.update(samples="3")), "shards[1].samples"),
    "manifest: samples negative": (_shard(1, lambda s: s.update(samples=-3)), "shards[1].samples"),
    "manifest: an empty shard list": (_m(lambda m: {**m, "shards": []}), "shards"),
    "manifest: classes as text": (_m(lambda m: {**m, "classes": "class_0"}), "classes"),
    "manifest: classes as numbers": (_m(lambda m: {**m, "classes": [0, 1, 2, 3]}), "classes[0]"),
    "manifest: classes twice": (_m(lambda m: {**m, "classes": ["a", "a"]}), "classes"),
    "manifest: a shard outside the folder": (_shard(0, lambda s: s.update(name="../../etc/x.tar")), "shards[0].name"),
    "manifest: a shard listed twice": (_shard(1, lambda s: s.update(name="shard-000000.tar")), "shards[1].name"),
    "manifest: complete as text": (_m(lambda m: {**m, "complete": "yes"}), "complete"),
    "manifest: another format": (_m(lambda m: {**m, "format": "webdataset"}), "format"),
    "manifest: version 2": (_m(lambda m: {**m, "version": 2}), "version"),
    "manifest: num_samples off": (_m(lambda m: {**m, "num_samples": 1000}), "num_samples"),
    "manifest: a bad entry outside": (_m(lambda m: {**m, "bad": [["/etc/passwd", "x"]]}), "bad[0]"),
    "manifest: shards not objects": (_m(lambda m: {**m, "shards": ["shard-000000.tar"]}), "shards[0]"),
    "manifest: truncated to a third": ("third", "(file)"),
    "manifest: truncated to a half": ("half", "(file)"),
    "manifest: truncated by 2 bytes": ("two", "(file)"),
    "manifest: a folder": ("folder", "(file)"),
}
TRAIN_CASES = [
    "a negative first offset",
    "tar replaced by another shard of its size",
    "manifest: samples as text",
    "manifest: a folder",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_shards")
    make_sample_data(str(tmp / "src"), n=8)
    template = tmp / "template"
    make_shards(str(tmp / "src"), str(template), shard_bytes=200_000, progress=False)  # 3 shards of 2-3 samples
    folders, argvs, names = {}, [], []
    for i, name in enumerate([*INDEX_CASES, *TAR_CASES, *MANIFEST_CASES]):
        folder = tmp / f"case{i}" / "shards"
        shutil.copytree(template, folder)
        _tamper(folder, name)
        folders[name] = folder
        argvs.append(["scan", str(folder)])
        names.append((name, "scan"))
    for name in TRAIN_CASES:  # train meets the same checks before it builds a model
        out = folders[name].parent
        argvs.append(["train", str(ROOT / "configs/demo.yaml"), "--set", f"data.data_path={folders[name]}", "--set",
                      "evaluation=null", "--set", f"logging.output_dir={out}/out", "--set",
                      f"checkpointing.checkpoint_dir={out}/ckpt"])  # fmt: skip
        names.append((name, "train"))
    results = run_cli(argvs, cwd=tmp)
    return {key: (folders[key[0]], r) for key, r in zip(names, results, strict=True)}


def _tamper(folder, name):
    idx, tar, manifest = folder / IDX, folder / "shard-000000.tar", folder / MANIFEST
    if name in INDEX_CASES:
        idx.write_text(INDEX_CASES[name][0](idx.read_text()), encoding="latin-1")
    elif name == "tar without its last data byte":
        last = idx.read_text().splitlines()[-1].split()
        tar.write_bytes(tar.read_bytes()[: int(last[-3]) + int(last[-2]) - 1])
    elif name == "tar replaced by another shard of its size":  # zero blocks added or cut at its end
        size, other = tar.stat().st_size, (folder / "shard-000001.tar").read_bytes()
        tar.write_bytes(other[:size] + bytes(max(0, size - len(other))))
    elif name in TAR_CASES:
        tar.write_bytes(TAR_CASES[name][0](tar.read_bytes()))
    else:
        change, raw = MANIFEST_CASES[name][0], manifest.read_bytes()
        cut = {"third": len(raw) // 3, "half": len(raw) // 2, "two": len(raw) - 2}
        if callable(change):
            manifest.write_text(json.dumps(change(json.loads(raw))))
        elif change == "folder":
            manifest.unlink()
            manifest.mkdir()
        else:
            manifest.write_bytes(change if isinstance(change, bytes) else raw[: cut[change]])


def _check(runs, name, command, *names):
    folder, r = runs[(name, command)]
    line = assert_one_error(r, *names, codes=(2,))
    tmp, allowed = folder.parent.parent, folder.parent if command == "train" else folder  # train: its out/ckpt too
    outside = [p for p in r["opened"] if p.startswith(f"{tmp}/") and not p.startswith(f"{allowed}/")]
    assert outside == []  # neither the source images nor another case's files
    return line


@pytest.mark.parametrize("case", [*INDEX_CASES, *TAR_CASES])
def test_a_bad_index_or_tar_is_one_error_line(runs, case):
    folder, _ = runs[(case, "scan")]
    what = {**INDEX_CASES, **TAR_CASES}[case][1]
    line = _check(runs, case, "scan", str(folder), "shard-000000.tar", what)
    assert ("bad index " + IDX) in line or case in TAR_CASES or "truncated" in what


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_bad_manifest_is_one_error_line(runs, case):
    folder, _ = runs[(case, "scan")]
    _check(runs, case, "scan", f"{folder / MANIFEST}: {MANIFEST_CASES[case][1]}")


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_names_it_too(runs, case):
    folder, r = runs[(case, "train")]
    line = _check(runs, case, "train", "data.data_path", str(folder))
    assert not (folder.parent / "ckpt/latest.pt").exists() and "model" not in line
