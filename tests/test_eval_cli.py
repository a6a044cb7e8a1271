"""`mae-fast eval` through the real command line (a subprocess each): bad values and destinations are one `error:`
line and exit 2 before any work; an undecodable image in the labelled sets is named, left out and counted."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import broken_huffman_copy
from PIL import Image


def run_eval(cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "mae_fast", "eval", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    (tmp / "a-file").write_text("")
    return tmp


# every case names a checkpoint and folders that do not exist: the value must be refused before they are looked at
BAD = {
    "--json to a folder": (["--json", "{t}"], "--json {t}: it is a folder; give a file name"),
    "--json under a file": (["--json", "{t}/a-file/e.json"], "--json {t}/a-file/e.json: cannot write into {t}/a-file"),
    "--batch-size 0": (["--batch-size", "0"], "argument --batch-size/--batch: must be in [1, 4096], got 0"),
    "--batch-size -4": (["--batch-size", "-4"], "argument --batch-size/--batch: must be in [1, 4096], got -4"),
    "--batch-size 10**12": (["--batch-size", str(10**12)], f"argument --batch-size/--batch: must be in [1, 4096], got {10**12}"),
    "--num-threads 0": (["--num-threads", "0"], "argument --num-threads/--workers: must be in [1, 256], got 0"),
    "--num-threads -2": (["--num-threads", "-2"], "argument --num-threads/--workers: must be in [1, 256], got -2"),
    "--seed -1": (["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    "--device bogus": (["--device", "bogus"], "--device: expected auto, cpu, cuda or cuda:N, got 'bogus'"),
    "--max-train 1 --linear": (["--max-train", "1", "--linear"], "--max-train 1 --linear: the linear probe needs"),
    "--k 0": (["--k", "0"], "argument --k: must be in [1, 1000000], got 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_eval_argument_is_one_error_line_before_any_work(place, case):
    extra, message = BAD[case]
    extra = [a.replace("{t}", str(place)) for a in extra]
    run = run_eval(place, "nope.pt", "--train", place / "no-train", "--val", place / "no-val", *extra)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and message.replace("{t}", str(place)) in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    (line,) = [x for x in lines if x.startswith("error: ")]
    # nothing else (argparse's usage before a bad number at most): no work was started
    assert line == lines[-1] and all(x.startswith(("usage: ", " ")) for x in lines[:-1])
    assert not (place / "a-file").is_dir() and sorted(p.name for p in place.iterdir()) == ["a-file"]


def labelled(root, classes, per_class, seed):
    rng = np.random.default_rng(seed)
    for c, rgb in enumerate(classes):
        for j in range(per_class):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            pixel = np.clip(np.array(rgb) + rng.integers(-10, 11), 0, 255).astype(np.uint8)
            Image.fromarray(np.broadcast_to(pixel, (40, 48, 3)).copy()).save(root / f"c{c}" / f"{j}.jpg")


def test_an_undecodable_image_is_named_left_out_and_counted(tmp_path, tiny_model):
    from mae_fast.config import config_from_dict

    colours = [(220, 40, 30), (40, 200, 60), (30, 60, 220)]
    labelled(tmp_path / "train", colours, 4, seed=0)
    labelled(tmp_path / "val", colours, 2, seed=1)
    bad_train, bad_val = tmp_path / "train/c0/zz.jpg", tmp_path / "val/c2/zz.jpg"
    broken_huffman_copy(tmp_path / "train/c0/0.jpg", bad_train)  # passes the scan, fails in DALI's decoder
    broken_huffman_copy(tmp_path / "val/c2/0.jpg", bad_val)
    cfg = config_from_dict({"model": {"type": "mae_vit_tiny_patch8"}, "data": {"input_size": 32}})
    ckpt = tmp_path / "final.pt"
    torch.save({"format": "mae-fast", "model": tiny_model.state_dict(), "config": cfg.to_dict(), "step": 7}, ckpt)
    out = tmp_path / "results/eval.json"
    run = run_eval(tmp_path, ckpt, "--train", tmp_path / "train", "--val", tmp_path / "val", "--k", "3", "--json", out)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert f"left out 2 file(s) that cannot be decoded: {bad_train}, {bad_val}" in run.stdout, run.stdout
    assert "12 train / 6 val images, 3 classes" in run.stdout  # the decodable ones
    record = json.loads(out.read_text())
    assert record["skipped"] == [str(bad_train), str(bad_val)] and (record["num_train"], record["num_val"]) == (12, 6)
    assert record["knn_top1"] == 100.0 and record["step"] == 7


def test_a_val_set_that_does_not_decode_at_all_is_one_error_line(tmp_path, tiny_model):
    from mae_fast.config import config_from_dict

    colours = [(220, 40, 30), (40, 200, 60)]
    labelled(tmp_path / "train", colours, 3, seed=0)
    for c in ("c0", "c1"):  # every val image passes the scan and fails in DALI's decoder
        (tmp_path / "val" / c).mkdir(parents=True)
        broken_huffman_copy(tmp_path / f"train/{c}/0.jpg", tmp_path / f"val/{c}/bad.jpg")
    cfg = config_from_dict({"model": {"type": "mae_vit_tiny_patch8"}, "data": {"input_size": 32}})
    ckpt = tmp_path / "final.pt"
    torch.save({"format": "mae-fast", "model": tiny_model.state_dict(), "config": cfg.to_dict(), "step": 1}, ckpt)
    run = run_eval(tmp_path, ckpt, "--train", tmp_path / "train", "--val", tmp_path / "val", "--k", "3")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
    assert "could be decoded" in line
