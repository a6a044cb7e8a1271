"""Bad destinations and bad command-line values, each a real command line, all in one driver process: one
`error:` line naming the argument (or key) and the path or value, exit 2, no traceback, and nothing done first
(no checkpoint opened, no image scanned, no model built). Full and read-only disks: test_fuzz_lock.py."""

from __future__ import annotations

import pytest
from fuzz_helpers import ROOT, assert_one_error, run_cli

from mae_fast.pipelines.sample_data import make_sample_data

DEMO = str(ROOT / "configs/demo.yaml")


def _train(**sets):
    pairs = {"evaluation": "null", "data.make_sample": "false", "data.data_path": "/nonexistent", **sets}
    return ["train", DEMO, *(a for k, v in pairs.items() for a in ("--set", f"{k}={v}"))]


DESTINATIONS = {  # name: (argv with {t} for the test folder, what the error line names)
    "make-sample-data under /proc": (["make-sample-data", "/proc/nope"], "make-sample-data DIR /proc/nope"),
    "make-sample-data onto a file": (["make-sample-data", "{t}/a-file"], "it is a file"),
    "make-sample-data under a file": (["make-sample-data", "{t}/a-file/x"], "Not a directory"),
    "make-shards onto a file": (["make-shards", "{t}/src", "{t}/a-file"], "make-shards DST {t}/a-file: it is a file"),
    "make-shards under /proc": (["make-shards", "{t}/src", "/proc/nope"], "make-shards DST /proc/nope"),
    "make-shards under a file": (["make-shards", "{t}/src", "{t}/a-file/s"], "cannot write there (Not a directory)"),
    "export timm to a folder": (["export", "{t}/c.pt", "--out", "{t}"], "--out {t}: it is a folder"),
    "export torchscript to a folder": (["export", "{t}/c.pt", "--format", "torchscript", "--out", "{t}"], "a folder"),
    "export exported to a folder": (["export", "{t}/c.pt", "--format", "exported", "--out", "{t}"], "a folder"),
    "export timm under /proc": (["export", "{t}/c.pt", "--out", "/proc/nope/e.safetensors"], "--out /proc/nope"),
    "export torchscript under a file": (
        ["export", "{t}/c.pt", "--format", "torchscript", "--out", "{t}/a-file/e.pt"],
        "cannot write into {t}/a-file",
    ),  # fmt: skip
    "visualize under /proc": (["visualize", "{t}/c.pt", "--images", "x.jpg", "--out", "/proc/nope/r.png"], "--out"),
    "bench-step --json to a folder": (["bench-step", DEMO, "--json", "{t}"], "--json {t}: it is a folder"),
    "bench-step --profile under /proc": (["bench-step", DEMO, "--profile", "/proc/nope/p.txt"], "--profile"),
    "bench-loader --json under a file": (["bench-loader", DEMO, "--json", "{t}/a-file/r.json"], "--json"),
    "bench --out-dir a file": (["bench", DEMO, "--out-dir", "{t}/a-file"], "--out-dir {t}/a-file: it is a file"),
    "train output_dir a file": (_train(**{"logging.output_dir": "{t}/a-file"}), "logging.output_dir"),
    "train checkpoint_dir under /proc": (
        _train(**{"checkpointing.checkpoint_dir": "/proc/nope"}),
        "checkpointing.checkpoint_dir: cannot write to /proc/nope",
    ),  # fmt: skip
}
VALUES = {  # name: (argv, the option named)
    "shard size inf": (["make-shards", "{t}/src", "{t}/s", "--shard-size-mb", "inf"], "--shard-size-mb"),
    "shard size nan": (["make-shards", "{t}/src", "{t}/s", "--shard-size-mb", "nan"], "--shard-size-mb"),
    "shard size 1e-9": (["make-shards", "{t}/src", "{t}/s", "--shard-size-mb", "1e-9"], "--shard-size-mb"),
    "shard size negative": (["make-shards", "{t}/src", "{t}/s", "--shard-size-mb", "-1"], "--shard-size-mb"),
    "shard size text": (["make-shards", "{t}/src", "{t}/s", "--shard-size-mb", "big"], "--shard-size-mb"),
    "make-shards workers 0": (["make-shards", "{t}/src", "{t}/s", "--workers", "0"], "--workers"),
    "make-shards workers huge": (["make-shards", "{t}/src", "{t}/s", "--workers", "1000000000"], "--workers"),
    "scan workers negative": (["scan", "{t}/src", "--workers", "-1"], "--workers"),
    "sample count 0": (["make-sample-data", "{t}/m", "--n", "0"], "--n"),
    "sample count 10**12": (["make-sample-data", "{t}/m", "--n", str(10**12)], "--n"),
    "sample count 1.5": (["make-sample-data", "{t}/m", "--n", "1.5"], "--n"),
    "max-steps 0": (["train", DEMO, "--max-steps", "0"], "--max-steps"),
    "bench-step steps 0": (["bench-step", DEMO, "--steps", "0"], "--steps"),
    "bench-step warmup negative": (["bench-step", DEMO, "--warmup", "-1"], "--warmup"),
    "bench batches negative": (["bench", DEMO, "--batches", "-1"], "--batches"),
    "bench-loader batches 0": (["bench-loader", DEMO, "--batches", "0"], "--batches"),
    "visualize seed -1": (["visualize", "{t}/c.pt", "--images", "x.jpg", "--seed", "-1"], "--seed"),
    "visualize mask ratio nan": (["visualize", "{t}/c.pt", "--images", "x.jpg", "--mask-ratio", "nan"], "--mask-ratio"),
    "visualize mask ratio 1.5": (["visualize", "{t}/c.pt", "--images", "x.jpg", "--mask-ratio", "1.5"], "--mask-ratio"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    t = tmp_path_factory.mktemp("fuzz_dest")
    (t / "a-file").write_text("")
    make_sample_data(str(t / "src"), n=2)
    (t / "c.pt").write_bytes(b"not opened: every case fails before the checkpoint is read")
    cases = {**DESTINATIONS, **VALUES}
    argvs = [[a.replace("{t}", str(t)) for a in argv] for argv, _ in cases.values()]
    return t, dict(zip(cases, run_cli(argvs, cwd=t), strict=True))


@pytest.mark.parametrize("case", list(DESTINATIONS))
def test_a_bad_destination_is_one_error_line_before_any_work(runs, case):
    t, results = runs
    r = results[case]
    assert_one_error(r, DESTINATIONS[case][1].replace("{t}", str(t)), codes=(2,))
    assert str(t / "c.pt") not in r["opened"]  # export, visualize: the checkpoint is never read
    assert not any(p.startswith(f"{t}/src/") for p in r["opened"])  # make-shards: no image scanned


@pytest.mark.parametrize("case", list(VALUES))
def test_a_bad_value_is_one_error_line(runs, case):
    t, results = runs
    line = assert_one_error(results[case], f"argument {VALUES[case][1]}:", codes=(2,))
    assert "must be in [" in line or "expected a" in line, line
    assert not (t / "s").exists() and not (t / "m").exists()
