"""Training on WebDataset shards, end to end on the CPU: make-shards then train, data.format detection and its
errors, exact resume after SIGKILL, a broken JPEG inside a shard, a truncated tar, a folder run's checkpoint
refused, two ranks, and bench-loader timing the folder against its shards."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import broken_huffman_copy
from helpers import ROOT, demo_cfg
from PIL import Image

from mae_fast.checkpoint import CheckpointError
from mae_fast.cli import main
from mae_fast.config import ConfigError, load_config
from mae_fast.data import find_dataset
from mae_fast.pipelines.dali import dali_available
from mae_fast.pipelines.make_shards import make_shards
from mae_fast.pipelines.scan import DatasetScanError

needs_dali = pytest.mark.skipif(not dali_available(), reason="needs nvidia.dali")
SHARD_BYTES = 120_000  # a few sample photos per shard


def write_tree(root: Path, n: int, classes: int = 2) -> Path:
    """n small JPEGs (a colour each) in root/c<i % classes>/<i>.jpg."""
    for i in range(n):
        (root / f"c{i % classes}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (7 * i % 256, 50, 200)).save(root / f"c{i % classes}/{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """96 sample photographs as a folder, and their shards (about 14 of them)."""
    from mae_fast.pipelines.sample_data import make_sample_data

    root = Path(tmp_path_factory.mktemp("data"))
    folder = make_sample_data(str(root / "sample"), n=96)
    make_shards(folder, str(root / "shards"), shard_bytes=SHARD_BYTES, workers=2, progress=False)
    return Path(folder), root / "shards"


def tiny(tmp_path: Path, data, *extra: str) -> list[str]:
    """--set overrides of a tiny run: 32 px, batch 16 as 2 x 8 -> 6 steps per epoch on 96 images, eager."""
    sets = [
        "evaluation=null",  # the demo's evaluation needs its labelled sample
        f"data.data_path={data}",
        "data.make_sample=false",
        "data.input_size=32",
        "optimization.batch_size=16",
        "optimization.micro_batch_size=8",
        "schedule.epochs=2",
        "schedule.warmup_epochs=1",
        "misc.compile=false",
        "logging.print_freq=1",
        "logging.dashboard=off",
        "logging.visualize_freq_epochs=0",
        f"logging.output_dir={tmp_path}/out",
        f"checkpointing.checkpoint_dir={tmp_path}/ckpt",
        "checkpointing.save_freq_epochs=0",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


# ---------------------------------------------------------------- config and format detection (no DALI needed)


def test_config_checks_format_and_shuffle_buffer(tmp_path):
    cfg = demo_cfg(tmp_path)
    assert (cfg.data.format, cfg.data.shuffle_buffer) == ("auto", 8192)
    with pytest.raises(ConfigError, match="data.shuffle_buffer: must be positive, got 0"):
        demo_cfg(tmp_path, "data.shuffle_buffer=0")
    with pytest.raises(ConfigError, match="data.format: must be auto, folder or shards, got 'tar'"):
        demo_cfg(tmp_path, "data.format=tar")


def test_format_detection_and_mismatch_errors(tmp_path):
    src = write_tree(tmp_path / "src", 20)
    report = make_shards(str(src), str(tmp_path / "shards"), shard_bytes=4000, workers=2, progress=False)
    assert report.shards > 1

    def dataset(path, *extra):
        return find_dataset(demo_cfg(tmp_path, f"data.data_path={path}", "data.make_sample=false", *extra), False)

    folder, shards = dataset(src), dataset(tmp_path / "shards")
    assert (folder.shards, folder.num_images, len(folder.files)) == (None, 20, 20)
    assert (shards.files, shards.num_images, len(shards.shards.tars)) == ([], 20, report.shards)
    assert dataset(tmp_path / "shards/manifest.json").num_images == 20  # the manifest names the folder too
    assert dataset(tmp_path / "shards", "data.format=shards").num_images == 20
    assert dataset(src, "data.format=folder").num_images == 20
    again = pickle.loads(pickle.dumps(shards))  # as broadcast to the other ranks
    assert again.shards.names == shards.shards.names and again.shards.fingerprint == shards.shards.fingerprint

    with pytest.raises(
        ConfigError, match=r"data.format: shards, but data.data_path .*src holds no shards.*make-shards"
    ):
        dataset(src, "data.format=shards")
    with pytest.raises(ConfigError, match=r"data.format: folder, but data.data_path .*shards holds WebDataset shards"):
        dataset(tmp_path / "shards", "data.format=folder")
    with pytest.raises(ConfigError, match="data.backend: pil reads image files; the shards in data.data_path"):
        dataset(tmp_path / "shards", "data.backend=pil")
    # a stray tar among images: auto takes the folder for shards and says how to read the images instead
    (src / "old.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(DatasetScanError, match=r"old.tar \(no index.*data.format: folder reads its images"):
        dataset(src)
    assert dataset(src, "data.format=folder").num_images == 20


# ---------------------------------------------------------------- training on shards


@needs_dali
def test_make_shards_then_train_on_them_with_the_cli(tmp_path, photos, capsys):
    """`mae-fast make-shards SRC DST && mae-fast train configs/demo.yaml --set data.data_path=DST/`."""
    folder, _ = photos
    dst = tmp_path / "shards"
    assert main(["make-shards", str(folder), str(dst), "--shard-size-mb", str(SHARD_BYTES / 2**20)]) == 0
    assert "96 samples in" in capsys.readouterr().out
    args = tiny(tmp_path, f"{dst}/", "logging.visualize_freq_epochs=1", "data.shuffle_buffer=32")
    assert main(["train", str(ROOT / "configs/demo.yaml"), *args]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"data: 96 samples in \d+ shards in {dst}/; shuffle buffer 32 samples \(~[\d.]+ MB held", out)
    assert "done: step 12/12" in out
    ckpt = torch.load(tmp_path / "ckpt/final.pt", weights_only=True)
    assert ckpt["data"][0]["kind"] == "shards" and ckpt["data"][0]["shuffle_buffer"] == 32
    # the reconstruction grid of 4 samples read from the shards: 4 rows of 4 panels at 32 px
    for epoch in (1, 2):
        with Image.open(tmp_path / f"out/reconstructions/epoch-{epoch}.png") as grid:
            assert grid.size == (4 * 32, 4 * 32)


@needs_dali
@pytest.mark.slow
def test_sigkill_then_auto_resume_on_shards_gives_the_uninterrupted_losses(tmp_path, photos):
    """As test_run's folder test: SIGKILL after the step-8 checkpoint (epoch 1, mid-block: blocks of 3 micro-batches,
    so block edges fall before the kill and mid-step), auto_resume, and the per-step losses are the same."""
    _, shards = photos

    def args(run: Path, out: str, *extra: str) -> list[str]:
        sets = tiny(run, shards, "data.shuffle_buffer=24", "schedule.epochs=3", *extra)
        return [*sets, "--set", f"logging.output_dir={run}/{out}"]

    assert_sigkill_resume_is_exact(args, tmp_path, total=18, kill_at=8)


def assert_sigkill_resume_is_exact(args, tmp_path: Path, total: int, kill_at: int) -> None:
    """A run of `total` steps, then the same run with a checkpoint every 4 steps SIGKILLed after its step-`kill_at`
    one and started again with auto_resume: the resumed run gives the uninterrupted run's per-step losses.
    args(run_folder, output_subfolder, *extra_sets) are the command line's arguments."""
    from test_run import kill_after_checkpoint, losses_by_step, spawn

    full = spawn(args(tmp_path / "a", "out"))
    assert full.wait(timeout=300) == 0, full.stdout.read()
    expect = losses_by_step(tmp_path / "a/out")
    assert sorted(expect) == list(range(1, total + 1))
    b = tmp_path / "b"
    resume = ("checkpointing.save_freq_steps=4", "misc.auto_resume=true")
    first = spawn(args(b, "out1", *resume))
    resumed_at = kill_after_checkpoint(first, b / "ckpt", kill_at)
    assert resumed_at >= kill_at and resumed_at % 4 == 0
    second = spawn(args(b, "out2", *resume))
    log = second.communicate(timeout=300)[0]
    assert second.returncode == 0, log
    assert f"resumed from {b}/ckpt/latest.pt: step {resumed_at}" in log
    got = losses_by_step(b / "out2")
    assert sorted(got) == list(range(resumed_at + 1, total + 1))
    for k, v in got.items():
        assert v == expect[k], f"step {k}: resumed {v} != uninterrupted {expect[k]}"


@needs_dali
def test_a_broken_jpeg_inside_a_shard_trains_and_is_named(tmp_path):
    from mae_fast.train import train

    src = write_tree(tmp_path / "src", 31)
    broken_huffman_copy(src / "c1/005.jpg", src / "c1/005b.jpg")  # passes make-shards' checks, decodes nowhere
    make_shards(str(src), str(tmp_path / "shards"), shard_bytes=8000, workers=2, progress=False)
    lines = []
    cfg = load_config(ROOT / "configs/demo.yaml", tiny(tmp_path, tmp_path / "shards")[1::2])
    result = train(cfg, log=lines.append)
    assert result.steps_done == 4  # 32 samples, batch 16, 2 epochs: the sample left out changed no shape
    ((name, reason),) = result.bad_files
    assert re.fullmatch(r"shard-\d{6}\.tar:c1/005b", name) and reason
    assert sum(f"WARNING: {name} cannot be decoded" in line for line in lines) == 1
    ckpt = torch.load(tmp_path / "ckpt/final.pt", weights_only=True)
    assert len(ckpt["data"][0]["substitutes"]) == 1  # a resumed run leaves it out too


def test_a_truncated_tar_is_named_by_train_before_any_model_is_built(tmp_path, capsys, monkeypatch):
    src = write_tree(tmp_path / "src", 20)
    make_shards(str(src), str(tmp_path / "shards"), shard_bytes=4000, workers=2, progress=False)
    tar = tmp_path / "shards/shard-000002.tar"
    tar.write_bytes(tar.read_bytes()[:1000])

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr("mae_fast.train.model_from_config", no_model)
    assert main(["train", str(ROOT / "configs/demo.yaml"), *tiny(tmp_path, tmp_path / "shards")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: data.data_path: .*shards: 1 of \d+ shards unusable: shard-000002.tar \(truncated", err)
    assert "Traceback" not in err and not list((tmp_path / "out").glob("*.log"))


@needs_dali
def test_a_folder_runs_checkpoint_is_refused_by_a_shard_run_and_the_reverse(tmp_path, photos, capsys):
    from mae_fast.train import train

    folder, shards = photos
    demo = str(ROOT / "configs/demo.yaml")
    assert main(["train", demo, *tiny(tmp_path, folder, "checkpointing.save_freq_steps=2"), "--max-steps", "2"]) == 0
    again = tiny(tmp_path, shards, "misc.auto_resume=true")
    assert main(["train", demo, *again]) == 1
    err = capsys.readouterr().err
    assert (
        f"cannot resume from {tmp_path}/ckpt/latest.pt: it was saved by a run reading image files (data.format "
        f"folder), this run reads WebDataset shards (data.format shards)"
    ) in err
    assert "misc.init_weights" in err

    other = tmp_path / "shard-run"
    assert main(["train", demo, *tiny(other, shards, "checkpointing.save_freq_steps=2"), "--max-steps", "2"]) == 0
    cfg = load_config(demo, tiny(other, folder, "misc.auto_resume=true")[1::2])
    with pytest.raises(CheckpointError, match="saved by a run reading WebDataset shards .* this run reads image files"):
        train(cfg, log=lambda m: None)


@needs_dali
@pytest.mark.slow
def test_torchrun_two_ranks_train_on_shards(tmp_path, photos):
    """Rank 0 opens the shards and broadcasts the set; a broken sample one rank meets is named once and left out
    on both; each rank's position is in the checkpoint."""
    from test_distributed import TORCHRUN_ENV, torchrun_args

    folder, _ = photos
    src = tmp_path / "src"
    (src / "c").mkdir(parents=True)
    for path in sorted(folder.rglob("*.JPEG"))[:31]:
        (src / "c" / path.name).write_bytes(path.read_bytes())
    broken_huffman_copy(next((src / "c").iterdir()), src / "c/huffman.JPEG")
    make_shards(str(src), str(tmp_path / "data"), shard_bytes=SHARD_BYTES, workers=2, progress=False)
    extra = ["--set", "data.shuffle_buffer=16", "--set", "schedule.epochs=2", "--set", "logging.dashboard=off"]
    run = subprocess.run(
        torchrun_args(tmp_path, tmp_path / "out", *extra),
        capture_output=True,
        text=True,
        env=TORCHRUN_ENV,
        cwd=tmp_path,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"data: 32 samples in \d+ shards", run.stdout) and "world_size: 2" in run.stdout
    assert len(re.findall(r"shard-\d{6}\.tar:c/huffman cannot be decoded", run.stdout)) == 1
    ckpt = torch.load(tmp_path / "ckpt/final.pt", weights_only=True)
    assert [s["kind"] for s in ckpt["data"]] == ["shards", "shards"]
    assert [s["shard_id"] for s in ckpt["data"]] == [0, 1]
    assert ckpt["data"][0]["substitutes"] == ckpt["data"][1]["substitutes"] != []


# ---------------------------------------------------------------- bench-loader: the folder against its shards


@needs_dali
def test_bench_loader_times_the_folder_and_its_shards(tmp_path, photos, capsys):
    folder, shards = photos
    demo = str(ROOT / "configs/demo.yaml")
    sets = tiny(tmp_path, folder)
    out = tmp_path / "bench.json"
    argv = [
        "bench-loader",
        demo,
        *sets,
        "--shards",
        str(shards),
        "--backend",
        "dali",
        "--batches",
        "3",
        "--warmup",
        "1",
    ]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["results"]) == ["dali", "shards"]
    for r in result["results"].values():
        assert r["img_s"] > 0 and r["MB_s"] > 0 and r["mean_image_kb"] > 1
    assert result["results"]["shards"]["reads"]["opens"] >= 1
    assert (
        result["ratio_shards_over_folder"] == result["results"]["shards"]["img_s"] / result["results"]["dali"]["img_s"]
    )
    assert "shards / folder (DALI):" in capsys.readouterr().out
    # the other way round, and the mistakes
    flipped = ["bench-loader", demo, *tiny(tmp_path, shards), "--folder", str(folder), "--batches", "2"]
    assert main([*flipped, "--warmup", "1", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())["results"]) == ["dali", "pil", "shards"]
    assert main(["bench-loader", demo, *tiny(tmp_path, shards), "--shards", str(shards)]) == 2
    assert "--shards: data.data_path" in capsys.readouterr().err
    assert main(["bench-loader", demo, *tiny(tmp_path, shards), "--backend", "pil"]) == 2
    assert "shards are read by DALI only" in capsys.readouterr().err


def _lose(shard: Path, how: str) -> None:
    if how == "deleted":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:  # replaced by another shard of the same size: caught by its first header, before anything is decoded
        size, other = shard.stat().st_size, (shard.parent / "shard-000000.tar").read_bytes()
        shard.write_bytes(other[:size] + bytes(max(0, size - len(other))))


@needs_dali
@pytest.mark.parametrize("how", ["deleted", "truncated", "replaced"])
def test_a_shard_lost_during_a_run_stops_it_with_a_checkpoint_and_it_resumes(tmp_path, photos, how):
    from mae_fast.train import train

    _, shards = photos
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    victim = data / "shard-000003.tar"
    kept = victim.read_bytes()
    sets = tiny(tmp_path, data, "data.shuffle_buffer=8", "schedule.epochs=4")[1::2]
    seen = []

    def tamper(snapshot, losses):  # at the first log point: the shard is read again in every epoch after this
        seen.append(snapshot)
        if len(seen) == 1:
            _lose(victim, how)

    with pytest.raises(DatasetScanError) as e:
        train(load_config(ROOT / "configs/demo.yaml", sets), log=lambda m: None, on_log=tamper)
    message = str(e.value)
    why = {"deleted": "cannot be read (No such file", "truncated": "changed during the run: ", "replaced": "no longer"}
    assert f"{victim} " in message and why[how] in message, message
    step = int(re.search(r"stopped at step (\d+), saved", message).group(1))
    saved = tmp_path / f"ckpt/step-{step}/model.pt"
    assert saved.exists() and f"misc.resume={saved}" in message and 1 <= step < 24
    assert torch.load(saved, weights_only=True)["data"][0]["batch"] % 2 == 0  # a whole step: 2 micro-batches each
    victim.write_bytes(kept)  # the shard is back: the run continues from the checkpoint to its end
    result = train(load_config(ROOT / "configs/demo.yaml", [*sets, f"misc.resume={saved}"]), log=lambda m: None)
    assert result.start_step == step and result.steps_done == 24
