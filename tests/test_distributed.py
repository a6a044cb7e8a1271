"""Several processes on the CPU (gloo): DDP equals one process, no_sync on accumulation micro-steps,
only rank 0 writes, a 2-rank run resumes from its checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import broken_huffman_copy, drop_key_bias
from helpers import step_records

from mae_fast.model import build_model
from mae_fast.optim import build_optimizer
from mae_fast.step import StepOptions, TrainStep

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
STEPS, WORLD, MICRO, ACCUM = 3, 2, 2, 2
GLOBAL = WORLD * MICRO * ACCUM


def global_batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL, 3, 32, 32, generator=g), torch.rand(GLOBAL, 16, generator=g)) for _ in range(STEPS)]


def make_step(micro, accum, ddp=False, compile=False):
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch8")
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU)
    # aot_eager: the same Dynamo tracing and DDP graph splitting as inductor, without its C++ compile time
    return TrainStep(
        model,
        opt,
        micro_batch=micro,
        accum_steps=accum,
        device=CPU,
        distributed=ddp,
        options=StepOptions(mask_ratio=0.75, gradient_clip=1.0, compile=compile, compile_backend="aot_eager"),
    )


def _worker(rank: int, store: str, out: str, compile: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    step = make_step(MICRO, ACCUM, ddp=True, compile=compile)
    first_grads = []
    for imgs, noise in global_batches():
        mine = slice(rank * MICRO * ACCUM, (rank + 1) * MICRO * ACCUM)  # this rank's shard of the global batch
        for i, (x, n) in enumerate(zip(imgs[mine].split(MICRO), noise[mine].split(MICRO))):
            step.run(x, last_micro=i == ACCUM - 1, noise=n)
            if i == 0:
                first_grads.append(step.model.decoder_pred.weight.grad.clone())
        step.optimizer_step(1e-3)
    torch.save({"params": step.model.state_dict(), "first_grads": first_grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, compile):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), compile), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    # the ranks agree exactly
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    # the first micro-step did not all-reduce (no_sync): the ranks' local gradients differ there
    assert not torch.allclose(r0["first_grads"][0], r1["first_grads"][0])
    # one process, all 8 images as 4 micro-batches of 2, gives the same weights
    single = make_step(MICRO, WORLD * ACCUM)
    for imgs, noise in global_batches():
        for x, n in zip(imgs.split(MICRO), noise.split(MICRO)):
            single.run(x, noise=n)
        single.optimizer_step(1e-3)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(drop_key_bias(k, v), drop_key_bias(k, r0["params"][k]), atol=1e-5, rtol=1e-4), k


TORCHRUN_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun_args(tmp_path, out, *extra):
    """`mae-fast train` on the demo config under torchrun, 2 CPU ranks, the data in tmp_path/data."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mae_fast",
        "train",
        str(ROOT / "configs/demo.yaml"),
        "--set",
        "evaluation=null",
        "--set",
        f"data.data_path={tmp_path}/data",
        "--set",
        "data.input_size=32",
        "--set",
        "misc.compile=false",
        "--set",
        "logging.print_freq=2",
        "--set",
        f"logging.output_dir={out}",
        "--set",
        f"checkpointing.checkpoint_dir={tmp_path}/ckpt",
        "--set",
        "checkpointing.save_freq_epochs=1",
        *extra,
    ]


def torchrun(tmp_path, out, *extra):
    args = torchrun_args(tmp_path, out, *extra)
    return subprocess.run(args, capture_output=True, text=True, env=TORCHRUN_ENV, cwd=tmp_path, timeout=180)


@pytest.mark.slow
def test_torchrun_two_ranks_train_write_once_and_resume(tmp_path):
    from mae_fast.pipelines.sample_data import make_sample_data

    data = make_sample_data(str(tmp_path / "data"), n=64)  # batch 32 over 2 ranks: 2 steps per epoch
    broken_huffman_copy(f"{data}/class_0/img_000000.JPEG", f"{data}/class_1/huffman.JPEG")  # passes the scan
    run = torchrun(tmp_path, tmp_path / "out1", "--set", "schedule.epochs=2")
    assert run.returncode == 0, run.stdout + run.stderr
    # one rank met it, rank 0 logged it once, and both ranks leave it out from then on
    assert run.stdout.count("huffman.JPEG cannot be decoded") == 1
    # only rank 0 wrote: one log file, one metrics file, one checkpoint tree; rank 1 printed nothing of its own
    assert len(list((tmp_path / "out1").glob("mae_pretrain_*.log"))) == 1
    records = step_records(tmp_path / "out1")
    assert [r["step"] for r in records] == [1, 2, 4]
    assert run.stdout.count("micro_batch_size: 16") == 1 and "world_size: 2" in run.stdout
    ckpt = torch.load(tmp_path / "ckpt/final.pt", weights_only=True)
    assert ckpt["derived"]["world_size"] == 2 and len(ckpt["data"]) == 2
    assert ckpt["data"][0]["shard_id"] == 0 and ckpt["data"][1]["shard_id"] == 1
    assert ckpt["data"][0]["substitutes"] == ckpt["data"][1]["substitutes"] != []
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == [".mae-fast.lock", "epoch-1", "epoch-2", "final.pt", "latest.pt"]  # the lock: rank 0's

    again = torchrun(tmp_path, tmp_path / "out2", "--set", "schedule.epochs=3", "--set", "misc.auto_resume=true")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {tmp_path}/ckpt/latest.pt: step 4" in again.stdout
    records = step_records(tmp_path / "out2")
    assert [r["step"] for r in records] == [5, 6]


def test_resume_with_another_world_size_is_refused():
    from mae_fast.checkpoint import CheckpointError, check_resumable
    from mae_fast.config import config_from_dict, derive

    cfg = config_from_dict({"optimization": {"batch_size": 64, "micro_batch_size": 8}})
    saved = {"config": cfg.to_dict(), "derived": vars(derive(cfg, 6400, world_size=2))}
    with pytest.raises(CheckpointError, match="world size: checkpoint 2, config 4"):
        check_resumable(saved, cfg, derive(cfg, 6400, world_size=4), "x.pt")


@pytest.mark.slow
def test_a_failing_rank_brings_the_job_down(tmp_path):
    import signal
    import time

    from mae_fast.pipelines.sample_data import make_sample_data

    make_sample_data(str(tmp_path / "data"), n=64)
    extra = ["--set", "schedule.epochs=100000", "--set", "checkpointing.save_freq_epochs=0"]
    proc = subprocess.Popen(
        torchrun_args(tmp_path, tmp_path / "out", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=TORCHRUN_ENV,
        cwd=tmp_path,
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / "out/metrics.jsonl").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            time.sleep(0.1)
        workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGKILL)  # rank 1 dies mid-run
        out = proc.communicate(timeout=120)[0]  # the job ends (no hang), with the cause named
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "Root Cause" in out and "rank      : 1" in out
