"""The run lock (FOLDER/.mae-fast.lock), planted or damaged, and full or read-only disks under every destination:
each a real command line in one driver process. A link at the lock's name is refused and its target never
touched, a FIFO or a folder there is refused, a full disk is one line naming the path; after a full disk
part-way through make-shards, a rerun completes and writes exactly what a clean run writes."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from fuzz_helpers import ROOT, assert_one_error, run_cli

from mae_fast.model import build_model
from mae_fast.pipelines.make_shards import make_shards
from mae_fast.pipelines.sample_data import make_sample_data

LOCK = ".mae-fast.lock"


def train(ckpt, out) -> list[str]:
    """A run that stops at its lock (or, were the lock taken, at its data path: nothing trains here)."""
    return ["train", str(ROOT / "configs/demo.yaml"), "--set", "evaluation=null", "--set", "data.make_sample=false",
            "--set", "data.data_path=/nonexistent", "--set", f"checkpointing.checkpoint_dir={ckpt}",
            "--set", f"logging.output_dir={out}"]  # fmt: skip


def test_planted_lock_files_are_refused(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("do not overwrite")
    cases = {}
    for name in ["link to a file", "dangling link", "fifo", "folder", "link in output_dir"]:
        ckpt, out = tmp_path / name / "ckpt", tmp_path / name / "out"
        ckpt.mkdir(parents=True)
        where = out if name == "link in output_dir" else ckpt
        where.mkdir(exist_ok=True)
        lock = where / LOCK
        if name.startswith("link"):
            lock.symlink_to(precious)
        elif name == "dangling link":
            lock.symlink_to(tmp_path / "created-through-the-link")
        elif name == "fifo":
            os.mkfifo(lock)
        else:
            lock.mkdir()
        cases[name] = (where, train(ckpt, out))
    results = dict(zip(cases, run_cli([argv for _, argv in cases.values()], cwd=tmp_path, timeout=120), strict=True))
    key = {"link in output_dir": "logging.output_dir"}
    for name, r in results.items():
        where = cases[name][0]
        line = assert_one_error(r, key.get(name, "checkpointing.checkpoint_dir"), str(where), codes=(2,))
        why = {"fifo": "is not a regular file", "folder": "Is a directory"}.get(name, "is a symbolic link; refused")
        assert why in line, line
    assert precious.read_text() == "do not overwrite"
    assert not (tmp_path / "created-through-the-link").exists()


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs unshare -rm and tmpfs mounts (a user namespace)")
def test_a_full_or_read_only_disk_is_one_line_and_a_rerun_completes(tmp_path):
    src, clean = tmp_path / "src", tmp_path / "clean"
    make_sample_data(str(src), n=8)
    make_shards(str(src), str(clean), shard_bytes=100_000, progress=False)  # 8 shards, ~530 KB
    torch.save({"model": build_model("mae_vit_tiny_patch8").state_dict()}, tmp_path / "tiny.pt")  # ~0.5 MB
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    # in a mount namespace of its own: `full` a 1 MiB tmpfs, filled up; `ro` a read-only one
    wrap = ["unshare", "-rm", "sh", "-c",
            f"mount -t tmpfs -o size=1m tmpfs {full} && mount -t tmpfs -o ro,size=64k tmpfs {ro} && "
            f"(head -c 2m /dev/zero > {full}/fill; exec \"$0\" \"$@\")"]  # fmt: skip
    argvs = {
        "train, full": train(full / "ckpt", full / "out"),
        "make-shards, full": ["make-shards", str(src), str(full / "s0"), "--cache-dir", str(tmp_path)],
        "make-sample-data, full": ["make-sample-data", str(full / "sample"), "--n", "2"],
        "export, full": ["export", "missing.pt", "--out", str(full / "e.safetensors")],
        "train, read-only": train(ro / "ckpt", ro / "out"),
        "make-shards, read-only": ["make-shards", str(src), str(ro / "s0")],
        "export torchscript, read-only": ["export", "missing.pt", "--format", "torchscript", "--out", str(ro / "e.pt")],
        "leave 64 KB": ["!", "sh", "-c", f"rm {full}/fill; head -c 960k /dev/zero > {full}/fill"],
        **{f"export {f}, full part-way": ["export", str(tmp_path / "tiny.pt"), "--format", f, "--out",
                                          str(full / f"e.{f}")] for f in ("timm", "torchscript", "exported")},
        "no partial export": ["!", "sh", "-c", f"ls {full}/e.* {full}/.e.*"],
        "leave 250 KB": ["!", "sh", "-c", f"rm {full}/fill; head -c 770k /dev/zero > {full}/fill"],
        "make-shards, full part-way": ["make-shards", str(src), str(full / "s1"), "--shard-size-mb",
                                       str(100_000 / 2**20), "--workers", "1", "--cache-dir", str(tmp_path)],
        "space again": ["!", "rm", f"{full}/fill"],
        "make-shards, rerun": ["make-shards", str(src), str(full / "s1"), "--shard-size-mb", str(100_000 / 2**20),
                               "--cache-dir", str(tmp_path)],
        "the same bytes": ["!", "diff", "-r", str(clean), str(full / "s1")],
    }  # fmt: skip
    r = dict(zip(argvs, run_cli(list(argvs.values()), cwd=tmp_path, wrap=wrap, timeout=200), strict=True))
    nospace, rofs = "No space left on device", "Read-only file system"
    assert_one_error(r["train, full"], "checkpointing.checkpoint_dir", f"{full}/ckpt/{LOCK}", nospace, codes=(2,))
    assert_one_error(r["make-shards, full"], "make-shards DST", f"{full}/s0", nospace, codes=(2,))
    assert not any(p.startswith(f"{src}/") for p in r["make-shards, full"]["opened"])  # refused before the scan
    assert_one_error(r["make-sample-data, full"], "make-sample-data DIR", nospace, codes=(2,))
    assert_one_error(r["export, full"], "--out", nospace, codes=(2,))
    assert_one_error(r["train, read-only"], "checkpointing.checkpoint_dir", f"{ro}/ckpt", rofs, codes=(2,))
    assert_one_error(r["make-shards, read-only"], "make-shards DST", rofs, codes=(2,))
    assert_one_error(r["export torchscript, read-only"], "--out", rofs, codes=(2,))
    for f in ("timm", "torchscript", "exported"):  # serialized in memory, written atomically: one line, no debris
        assert_one_error(r[f"export {f}, full part-way"], f"could not write {full}/e.{f}", nospace, codes=(1,))
    assert r["no partial export"]["code"] != 0 and not r["no partial export"]["stdout"]
    assert r["leave 250 KB"]["code"] == 0
    assert_one_error(r["make-shards, full part-way"], f"{full}/s1/shard-0000", "not written", nospace, codes=(1,))
    assert r["make-shards, rerun"]["code"] == 0, r["make-shards, rerun"]
    assert "8 samples in 8 shards" in r["make-shards, rerun"]["stdout"]
    assert r["the same bytes"]["code"] == 0, r["the same bytes"]["stdout"]
