"""GPU checks of the trainer (run on the GPU machine with `pytest -m gpu`; skipped without CUDA)."""

from pathlib import Path

import pytest
import torch
from conftest import broken_huffman_copy
from helpers import Recorder

from mae_fast.config import load_config
from mae_fast.model import build_model
from mae_fast.optim import build_optimizer
from mae_fast.step import StepOptions, TrainStep

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_compiled_bf16_step_matches_eager_and_has_no_graph_break():
    from torch._dynamo.testing import CompileCounterWithBackend

    dev = torch.device("cuda")
    losses = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = build_model("mae_vit_tiny_patch8").to(dev)
        opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), dev)
        counter = CompileCounterWithBackend("inductor")
        step = TrainStep(
            model,
            opt,
            micro_batch=16,
            accum_steps=2,
            device=dev,
            input_dtype=torch.float16,
            options=StepOptions(mask_ratio=0.75, gradient_clip=1.0, compile=compile, compile_backend=counter),
        )
        g = torch.Generator(device=dev).manual_seed(1)
        for _ in range(5):
            for _ in range(2):
                step.run(
                    torch.randn(16, 3, 32, 32, device=dev, generator=g),
                    noise=torch.rand(16, 16, device=dev, generator=g),
                )
            step.optimizer_step(1e-3)
        losses.append(step.read_metrics()[0])
        if compile:
            assert counter.frame_count == 1
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


def test_demo_trains_on_gpu_with_dali_mixed_decode_and_resumes(tmp_path):
    from mae_fast.train import train

    args = [
        f"data.data_path={tmp_path}/sample",
        f"evaluation.train_path={tmp_path}/labelled/train",  # the demo's labelled sample, written on first use
        f"evaluation.val_path={tmp_path}/labelled/val",
        f"logging.output_dir={tmp_path}/o",
        f"checkpointing.checkpoint_dir={tmp_path}/c",
        "schedule.warmup_epochs=1",
        "misc.auto_resume=true",
    ]
    lines = []
    rec = Recorder()
    result = train(load_config(ROOT / "configs/demo.yaml", args + ["schedule.epochs=3"]), log=lines.append, on_log=rec)
    assert any("decode on GPU (mixed)" in x for x in lines)
    assert any(x.startswith("eval epoch 3: knn top-1") for x in lines)  # the evaluation at the end, on the GPU
    assert result.steps_done == 24 and all(v == v for v in rec.losses)
    assert all(s.busy_pct is not None and 0 < s.busy_pct <= 100 for s in rec.snapshots[1:])  # CUDA events
    # resume on the GPU (RNG states, optimizer and DALI position loaded onto the device) and go on
    rec = Recorder()
    result = train(load_config(ROOT / "configs/demo.yaml", args + ["schedule.epochs=4"]), log=lines.append, on_log=rec)
    assert result.start_step == 24 and result.steps_done == 32


def test_dali_cpu_decode_rest_on_gpu(tmp_path):
    from mae_fast.pipelines.common import Augmentation
    from mae_fast.pipelines.dali import DaliLoader
    from mae_fast.pipelines.sample_data import make_sample_data
    from mae_fast.pipelines.scan import scan_dataset

    files = scan_dataset(make_sample_data(str(tmp_path / "s"), n=32), progress=False).files
    loader = DaliLoader(files, 16, Augmentation(), input_size=64, seed=0, device_id=0, decoder="cpu")
    assert not loader.gpu_decode
    batch = next(iter(loader))
    assert batch.is_cuda and batch.shape == (16, 3, 64, 64) and batch.dtype == torch.float16
    assert abs(batch.float().mean().item()) < 1.0


@pytest.mark.parametrize(
    "switch",
    [
        "model.embed_kept_only=true",
        "misc.compile_optimizer=true",
        "misc.attention=flash",
        "misc.attention=cudnn",
        "misc.precision=bf16",
    ],
)
def test_performance_switches_train_as_the_default_step(switch):
    """Each switch of bench-step --variant, compiled on the GPU: the same losses as the default step."""
    from helpers import config_step_losses, tiny_step_config

    dev = torch.device("cuda")
    plain, switched = (config_step_losses(tiny_step_config(*o), dev) for o in ([], [switch]))
    assert switched == pytest.approx(plain, rel=2e-2)


def test_gpu_decoder_failure_on_a_file_is_recovered(tmp_path):
    """nvJPEG (mixed decoding) and a JPEG with a broken Huffman table that passes the scan: the loader
    leaves it out and goes on, or decodes it; either way the epoch is complete."""
    from mae_fast.pipelines.common import Augmentation
    from mae_fast.pipelines.dali import DaliLoader
    from mae_fast.pipelines.sample_data import make_sample_data
    from mae_fast.pipelines.scan import scan_dataset

    root = Path(make_sample_data(str(tmp_path / "s"), n=31))
    broken_huffman_copy(next(root.glob("class_0/*.JPEG")), root / "class_0/huffman.JPEG")
    files = scan_dataset(str(root), progress=False).files
    assert len(files) == 32
    loader = DaliLoader(files, 16, Augmentation(), input_size=64, seed=0, device_id=0)
    assert loader.gpu_decode
    batches = [b.clone() for b in loader]
    assert len(batches) == 2 and all(b.is_cuda and b.shape == (16, 3, 64, 64) for b in batches)
    import warnings

    warnings.warn(
        f"nvJPEG and a broken Huffman table: left out {loader.take_bad_files()}", stacklevel=1
    )  # in the session log


def test_training_on_a_high_priority_stream(tmp_path):
    """misc.high_priority_stream: the step and DALI's outputs meet on the training stream; a demo trains,
    its checkpoint resumes, and the losses are finite."""
    from mae_fast.runtime import train_stream
    from mae_fast.train import train

    dev = torch.device("cuda")
    default = torch.cuda.current_stream(dev)
    with train_stream(dev, True):
        stream = torch.cuda.current_stream(dev)
        assert stream != default and stream.priority < default.priority
    assert torch.cuda.current_stream(dev) == default
    args = [
        f"data.data_path={tmp_path}/sample",
        "evaluation=null",
        f"logging.output_dir={tmp_path}/o",
        "misc.high_priority_stream=true",
        f"checkpointing.checkpoint_dir={tmp_path}/c",
        "schedule.warmup_epochs=1",
        "misc.auto_resume=true",
    ]
    rec = Recorder()
    result = train(load_config(ROOT / "configs/demo.yaml", args + ["schedule.epochs=2"]), on_log=rec)
    assert result.steps_done == 16 and all(v == v and v < 10 for v in rec.losses)
    rec = Recorder()
    result = train(load_config(ROOT / "configs/demo.yaml", args + ["schedule.epochs=3"]), on_log=rec)
    assert result.start_step == 16 and result.steps_done == 24
