"""Where a run's time goes: the run report, the profiler window, MFU against a named peak, CUDA memory and its
out-of-memory error, and Weights & Biases (offline, read back from the run's own files)."""

import gzip
import json
import struct
import sys
import time

import pytest
import torch
from helpers import ROOT, Recorder, demo_cfg

from mae_fast.cli import EXIT_ERROR, EXIT_USAGE, main
from mae_fast.metrics import Meter, card_peak, format_line
from mae_fast.train import train

# the demo on synthetic images, eager: 256 images, batch 32 -> 8 steps per epoch, 2 epochs
SHORT = ["data.backend=synthetic", "data.synthetic_images=256", "misc.compile=false", "schedule.epochs=2"]
SHORT += ["logging.print_freq=4", "logging.visualize_freq_epochs=0", "checkpointing.save_freq_epochs=0"]


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_profiler_window_leaves_a_trace_and_a_table_and_changes_neither_losses_nor_rates(tmp_path):
    plain, profiled = Recorder(), Recorder()
    one_epoch = [*SHORT, "schedule.epochs=1", "schedule.warmup_epochs=1"]  # 8 steps
    train(demo_cfg(tmp_path / "a", *one_epoch), log=lambda m: None, on_log=plain)
    lines = []
    cfg = demo_cfg(tmp_path / "b", *one_epoch, "logging.profile_start_step=5", "logging.profile_steps=3")
    train(cfg, log=lines.append, on_log=profiled)
    assert profiled.losses == plain.losses and len(plain.losses) == 8  # the run's losses are unchanged

    trace = tmp_path / "b/out/profile/trace-steps-5-7.json.gz"
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)  # Perfetto / chrome://tracing's JSON, with the ops
    text = "\n".join(lines)
    assert f"profile of steps 5-7: trace {trace}" in text and "top kernels by self CPU time" in text
    table = text.split("top kernels by self CPU time:\n", 1)[1]
    assert "Self CPU" in table and "aten::mm" in table
    log_file = next((tmp_path / "b/out").glob("mae_pretrain_*.log")).read_text()
    assert "top kernels by self CPU time" in log_file and "aten::mm" in log_file

    # the profiled steps are read before and after the window; that interval's img/s, ms/iter and ETA are the
    # previous timed interval's, and the interval after it starts when profiling is done
    snaps = {s.step: s for s in profiled.snapshots}
    assert sorted(snaps) == [1, 4, 7, 8]
    assert snaps[7].samples_per_s == snaps[4].samples_per_s and snaps[7].ms_per_iter == snaps[4].ms_per_iter
    assert snaps[7].eta_run_s == snaps[4].ms_per_iter / 1000 and snaps[7].busy_pct is None
    assert [s.step for s in plain.snapshots] == [1, 4, 8]
    assert snaps[8].samples_per_s != snaps[4].samples_per_s  # step 8 alone, timed after the window


def test_run_report_is_the_first_record_and_the_cpu_claims_no_mfu_or_memory(tmp_path):
    lines = []
    train(demo_cfg(tmp_path, *SHORT, "schedule.epochs=1", "schedule.warmup_epochs=1"), log=lines.append)
    first, *steps = rows(tmp_path / "out")
    assert first["kind"] == "report"
    assert first["torch"] == torch.__version__ and first["mae_fast"] and first["timm"] and "dali" in first
    assert first["world_size"] == 1 and first["effective_batch"] == 32 and first["attention"] == "auto"
    assert first["device"].startswith("cpu") and first["precision"] == "amp (fp32 on the CPU)"
    assert "git_commit" in first and "cuda" in first and "device_count" in first
    versions, machine = lines[0].splitlines()  # printed first, before the data and the config
    assert versions.startswith("run: mae-fast ") and f"torch {torch.__version__}" in versions
    assert "world size 1" in machine and "effective batch 32 (32 x 1 accum x 1 ranks)" in machine
    assert [r["step"] for r in steps] == [1, 4, 8] and all("kind" not in r for r in steps)
    for key in ("mfu", "mfu_peak", "mem_gb", "mem_reserved_gb", "alloc_retries"):  # no MFU, no memory off CUDA
        assert key not in steps[-1], key
    text = "\n".join(lines)
    assert "no MFU is claimed on the CPU" in text and "GFLOP per image" in text
    assert "mfu" not in text.lower().replace("no mfu is claimed", "").replace("mfu: ", "")


def test_card_peaks_are_matched_by_name_and_every_mfu_names_its_peak():
    names = {
        "NVIDIA H200": "H200 dense bf16 peak 989",
        "NVIDIA H200 NVL": "H200 NVL dense bf16 peak 835",
        "NVIDIA H100 80GB HBM3": "H100 SXM dense bf16 peak 989",
        "NVIDIA H100 PCIe": "H100 PCIe dense bf16 peak 756",
        "NVIDIA A100-SXM4-80GB": "A100 dense bf16 peak 312",
        "NVIDIA L40S": "L40S dense bf16 peak 362",
        "NVIDIA L40": "L40 dense bf16 peak 181",
        "NVIDIA L4": "L4 dense bf16 peak 121",
    }
    for device, name in names.items():
        assert card_peak(device).name.startswith(name), device
    assert card_peak("Tesla V100-SXM2-16GB") is None and card_peak("cpu") is None  # no bf16 peak: no MFU
    assert card_peak("NVIDIA H100 80GB HBM3", world_size=8).flops == 8 * 989e12
    assert card_peak("NVIDIA H100 80GB HBM3", world_size=8).name.startswith("8 x H100 SXM")

    meter = Meter(effective_batch=100, steps_per_epoch=10, total_steps=100, flops_per_step=1e12, peak=card_peak("H200"))
    snap = meter.update(first_step=0, losses=[1.0, 0.9], gnorms=[1.0, 1.0], lr=1e-3, data_wait_s=0.0)
    assert snap.mfu > 0 and f"mfu {100 * snap.mfu:.1f}% of H200 dense bf16 peak 989 TFLOP/s" in format_line(snap)
    assert snap.record()["mfu_peak"] == "H200 dense bf16 peak 989 TFLOP/s"
    from mae_fast.bench import format_mfu, mfu_of

    bench = mfu_of(400e12, 800e12, card_peak("NVIDIA H200"))
    assert format_mfu(bench) == "MFU 50.0% of measured matmul, 40.4% of card peak"
    assert format_mfu(mfu_of(400e12, 800e12, None)) == "MFU 50.0% of measured matmul"
    untimed = meter.update(first_step=2, losses=[0.8], gnorms=[1.0], lr=1e-3, data_wait_s=5.0, timed=False)
    assert (untimed.samples_per_s, untimed.mfu, untimed.data_wait_pct) == (snap.samples_per_s, snap.mfu, 0.0)


def test_out_of_memory_stops_with_one_line_naming_the_micro_batch(tmp_path, capsys, monkeypatch):
    from mae_fast.step import TrainStep

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(TrainStep, "run", oom)
    args = ["train", str(ROOT / "configs/demo.yaml"), "--set", "evaluation=null"]
    for o in [*SHORT, f"logging.output_dir={tmp_path}/out", f"checkpointing.checkpoint_dir={tmp_path}/ckpt"]:
        args += ["--set", o]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: CUDA out of memory in training step 1 at optimization.micro_batch_size 32: lower "
        "optimization.micro_batch_size (the effective batch and lr stay, the accumulation steps rise), or set "
        "model.grad_checkpointing: true"
    ]  # on the CPU no memory snapshot (the CUDA path is in test_cuda_memory_and_out_of_memory_snapshot)


# ---------------------------------------------------------------- Weights & Biases, offline


def wandb_records(run_dir, timeout: float = 60):
    """An offline run's records, once the last one (its exit record) is on disk: wandb-core, a process of its own,
    may still be writing the file when run.finish() returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = _read_wandb_log(run_dir)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _read_wandb_log(run_dir):
    """The records of an offline run's transaction log, run-<id>.wandb: LevelDB's log format (32 KiB blocks of
    chunks, each a 7-byte header: crc32, length, type) after W&B's 7-byte header, each record one of wandb's own
    protobuf Records. (wandb 0.31 has no Python reader of its own: `wandb sync` uploads, `wandb leet` is a
    terminal UI.)"""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, chunk, out = path.read_bytes(), 7, b"", []
    assert data.startswith(b":W&B")
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):  # the end, or a chunk being written
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def history(records):
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir/wandb"


def test_wandb_offline_run_holds_the_loss_the_knn_the_images_and_the_config_and_a_resume_continues_it(
    tmp_path, offline_wandb
):
    pytest.importorskip("skimage")
    from mae_fast.pipelines.sample_data import make_labelled_sample

    labelled = make_labelled_sample(str(tmp_path / "labelled"), n_train=12, n_val=6, seed=0)
    wb = ["logging.wandb_project=demo", "logging.wandb_mode=offline", "logging.wandb_run_name=tiny"]
    evaluation = [f"evaluation.train_path={labelled}/train", f"evaluation.val_path={labelled}/val"]
    evaluation += ["evaluation.freq_epochs=1", "evaluation.k=3"]
    cfg = demo_cfg(tmp_path, *SHORT, *wb, *evaluation, "data.input_size=32")
    train(cfg, log=lambda m: None, max_steps=8)  # one epoch: an evaluation and a step-8 checkpoint
    (first,) = offline_wandb.glob("offline-run-*")
    run_id = json.loads((tmp_path / "ckpt/wandb-run.json").read_text())["id"]
    assert first.name.endswith(f"-{run_id}")
    records = wandb_records(first)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name) == (run_id, "demo", "tiny")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["optimization"]["batch_size"] == 32 and config["run_report"]["kind"] == "report"
    rows = history(records)
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    metrics = {
        r["step"]: r["loss"] for r in (json.loads(x) for x in (tmp_path / "out/metrics.jsonl").open()) if "loss" in r
    }
    assert losses == metrics and sorted(losses) == [1, 4, 8]  # the TensorBoard scalars, at their steps
    baseline, knn = [r for r in rows if "eval/knn_top1" in r]  # epoch 0 (before the first step), then epoch 1
    assert (baseline["step"], baseline["epoch"], knn["step"], knn["epoch"]) == (0, 0, 8, 1)
    assert 0 <= knn["eval/knn_top1"] <= 100 and "eval/knn_top5" in knn

    resumed = demo_cfg(tmp_path, *SHORT, *wb, *evaluation, "data.input_size=32", "misc.auto_resume=true")
    train(resumed, log=lambda m: None, max_steps=4)  # the same W&B run, from step 9 on
    second = [p for p in offline_wandb.glob("offline-run-*") if p != first]
    assert len(second) == 1 and second[0].name.endswith(f"-{run_id}")
    (run2,) = [r.run for r in wandb_records(second[0]) if r.WhichOneof("record_type") == "run"]
    assert run2.run_id == run_id
    assert sorted(r["step"] for r in history(wandb_records(second[0])) if "train/loss" in r) == [9, 12]


def test_wandb_gets_the_reconstruction_grids_as_images(tmp_path, offline_wandb):
    from PIL import Image

    from mae_fast.config import derive
    from mae_fast.runlog import RunLog
    from mae_fast.tracking import WandbRun

    cfg = demo_cfg(tmp_path, "logging.wandb_project=demo", "logging.wandb_mode=offline")
    png = tmp_path / "epoch-1.png"
    Image.new("RGB", (16, 8), "red").save(png)
    out = RunLog(None, echo=lambda m: None)
    out.tracker = WandbRun.start(cfg, derive(cfg, 256), {"kind": "report"})
    out.image(png, 8, "epoch 1")  # what Trainer.visualize hands on after writing the grid
    out.close()
    (run,) = offline_wandb.glob("offline-run-*")
    (image,) = [r for r in history(wandb_records(run)) if "reconstructions/_type" in r]  # nested keys: a/b
    assert image["step"] == 8 and image["reconstructions/_type"] == "image-file"
    assert (image["reconstructions/width"], image["reconstructions/height"]) == (16, 8)
    assert (run / "files" / image["reconstructions/path"]).read_bytes() == png.read_bytes()


def test_the_wandb_id_file_is_validated_when_read_back(tmp_path):
    from mae_fast.checkpoint import CheckpointError
    from mae_fast.tracking import read_run_id

    path = tmp_path / "wandb-run.json"
    path.write_text('{"project": "demo", "id": "e6kw84zb"}')
    assert read_run_id(path, "demo") == "e6kw84zb" and read_run_id(path, "other") is None  # another project: new run
    for text in ("", "[1]", '{"id": 5}', '{"id": "a/b"}', '{"id": ""}', "\xff"):
        path.write_text(text)
        with pytest.raises(CheckpointError, match=f"^{path}: "):
            read_run_id(path, "demo")


def test_a_bad_wandb_id_file_is_refused_naming_it(tmp_path, offline_wandb, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/wandb-run.json").write_text('{"id": "../../etc"}')
    args = ["train", str(ROOT / "configs/demo.yaml"), "--set", "evaluation=null", "--max-steps", "1"]
    for o in [*SHORT, "misc.auto_resume=true", "logging.wandb_project=demo", "logging.wandb_mode=offline"]:
        args += ["--set", o]
    args += ["--set", f"logging.output_dir={tmp_path}/out", "--set", f"checkpointing.checkpoint_dir={tmp_path}/ckpt"]
    (tmp_path / "ckpt/latest.pt").write_bytes(b"")  # a resume: the id file is read
    assert main(args) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/ckpt/wandb-run.json: not a W&B run id file") and "delete it" in err


def test_wandb_online_without_a_login_is_one_error_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = ["train", str(ROOT / "configs/demo.yaml"), "--set", "evaluation=null", "--set", "logging.wandb_project=demo"]
    for o in [*SHORT, f"logging.output_dir={tmp_path}/out", f"checkpointing.checkpoint_dir={tmp_path}/ckpt"]:
        args += ["--set", o]
    assert main(args) == EXIT_USAGE
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: logging.wandb_mode: online: W&B could not start the run (") and "wandb login" in err


def test_a_wandb_project_without_wandb_installed_stops_before_any_work(tmp_path, capsys, monkeypatch):
    import mae_fast.train

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError

    def no_scan(*a, **k):
        raise AssertionError("the data was scanned")

    monkeypatch.setattr(mae_fast.train, "find_dataset", no_scan)
    args = ["train", str(ROOT / "configs/demo.yaml"), "--set", "logging.wandb_project=demo"]
    args += ["--set", f"logging.output_dir={tmp_path}/out", "--set", f"checkpointing.checkpoint_dir={tmp_path}/ckpt"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: logging.wandb_project is 'demo' but wandb is not installed: pip install 'mae-fast[wandb]' "
        '(or pip install wandb), or set logging.wandb_project to ""'
    ]


# ---------------------------------------------------------------- CUDA (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_and_out_of_memory_snapshot(tmp_path, capsys, monkeypatch):
    import pickle

    lines = []
    train(
        demo_cfg(tmp_path / "a", *SHORT, "schedule.epochs=1", "schedule.warmup_epochs=1", "misc.device=cuda"),
        log=lines.append,
    )
    first, *steps = rows(tmp_path / "a/out")
    assert first["device_count"] >= 1 and first["device"] == torch.cuda.get_device_name()
    last = steps[-1]
    assert last["mem_gb"] > 0 and last["mem_reserved_gb"] >= last["mem_gb"] and last["alloc_retries"] >= 0
    peak = card_peak(torch.cuda.get_device_name())
    if peak is not None:  # a known card: every MFU names its peak
        assert last["mfu_peak"] == peak.name and f"of {peak.name}" in "\n".join(lines)

    from mae_fast.step import TrainStep

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(TrainStep, "run", oom)
    args = ["train", str(ROOT / "configs/demo.yaml"), "--set", "evaluation=null", "--set", "misc.device=cuda"]
    for o in [*SHORT, f"logging.output_dir={tmp_path}/b/out", f"checkpointing.checkpoint_dir={tmp_path}/b/ckpt"]:
        args += ["--set", o]
    assert main(args) == EXIT_USAGE
    (err,) = capsys.readouterr().err.strip().splitlines()
    snapshot = tmp_path / "b/out/memory-snapshot-step-1.pickle"
    assert f"memory snapshot: {snapshot}" in err and "https://pytorch.org/memory_viz" in err
    assert "segments" in pickle.loads(snapshot.read_bytes())
