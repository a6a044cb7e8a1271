import math

import pytest
import torch
import torch.nn.functional as F
from conftest import drop_key_bias

from mae_fast.model import build_model
from mae_fast.optim import build_optimizer, cosine_lr, param_groups
from mae_fast.step import StepOptions, TrainStep

CPU = torch.device("cpu")


def make_step(seed=0, micro=8, accum=1, compile=False, backend="inductor", clip=0.0, norm_pix=False):
    torch.manual_seed(seed)
    model = build_model("mae_vit_tiny_patch8", norm_pix_loss=norm_pix)
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU)
    return TrainStep(
        model,
        opt,
        micro_batch=micro,
        accum_steps=accum,
        device=CPU,
        options=StepOptions(mask_ratio=0.75, gradient_clip=clip, compile=compile, compile_backend=backend),
    )


def run_steps(step, batches, lrs):
    for lr, micro_batches in zip(lrs, batches):
        for i, b in enumerate(micro_batches):
            step.run(b, last_micro=i == len(micro_batches) - 1)
        step.optimizer_step(lr)
    return step.read_metrics()[0]


def test_compiled_equals_eager_and_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    eager, compiled = make_step(), make_step(compile=True, backend=counter)
    g = torch.Generator().manual_seed(1)
    batches = [[torch.randn(8, 3, 32, 32, generator=g)] for _ in range(4)]
    lrs = [1e-3, 5e-4, 2e-3, 1e-4]  # a changing lr must not recompile
    torch.manual_seed(5)
    l_eager = run_steps(eager, batches, lrs)
    torch.manual_seed(5)
    l_comp = run_steps(compiled, batches, lrs)
    assert counter.frame_count == 1  # one graph: fullgraph, no recompiles
    assert l_comp == pytest.approx(l_eager, rel=2e-4, abs=1e-5)
    for (n, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        assert torch.allclose(p, q, atol=2e-4, rtol=1e-3), n


def test_accumulation_of_4x2_equals_batch_of_8():
    g = torch.Generator().manual_seed(2)
    big = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    one, four = make_step(micro=8, accum=1, clip=1.0), make_step(micro=2, accum=4, clip=1.0)
    # the masking noise of 4 (2,16) draws equals one (8,16) draw on the CPU generator
    for step, chunks in ((one, 1), (four, 4)):
        torch.manual_seed(3)
        for b in big[0].chunk(chunks):
            step.run(b)
    for (n, p), q in zip(one.model.named_parameters(), four.model.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), n
    one.optimizer_step(1e-3)
    four.optimizer_step(1e-3)
    torch.manual_seed(4)
    l1 = run_steps(one, [[big[1]]], [1e-3])
    torch.manual_seed(4)
    l4 = run_steps(four, [list(big[1].split(2))], [1e-3])
    assert l4 == pytest.approx(l1, rel=1e-5)
    for (n, p), q in zip(one.model.named_parameters(), four.model.parameters()):
        assert torch.allclose(p, q, atol=1e-4), n


def test_tiny_model_overfits_one_batch():
    step = make_step(clip=1.0)
    # smooth images, so masked patches are predictable from the visible ones
    batch = F.interpolate(torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=32, mode="bilinear")
    losses = run_steps(step, [[batch]] * 300, [3e-3] * 300)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_lr_schedule_values():
    peak, floor, warm, total = 2.4e-3, 1e-5, 100, 1000
    assert cosine_lr(0, peak, floor, warm, total) == 0.0
    assert cosine_lr(50, peak, floor, warm, total) == pytest.approx(peak / 2)
    assert cosine_lr(warm, peak, floor, warm, total) == pytest.approx(peak)  # warm-up end
    mid = warm + (total - warm) // 2
    assert cosine_lr(mid, peak, floor, warm, total) == pytest.approx(floor + (peak - floor) / 2)  # mid cosine
    assert cosine_lr(total, peak, floor, warm, total) == pytest.approx(floor)  # the end
    q = warm + (total - warm) // 4
    assert cosine_lr(q, peak, floor, warm, total) == pytest.approx(
        floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4))
    )


def test_weight_decay_groups():
    model = build_model("mae_vit_tiny_patch8")
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.qkv.weight" in d and "decoder_pred.weight" in d and "patch_embed.proj.weight" in d
    assert "cls_token" in d and "mask_token" in d  # 3-D tokens decay, as the official add_weight_decay
    assert "blocks.0.attn.qkv.bias" in nd and "norm.weight" in nd and "blocks.1.norm2.weight" in nd
    assert "pos_embed" not in d | nd  # frozen
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])


def test_lr_is_a_shared_tensor():
    step = make_step()
    step.run(torch.randn_like(step.inputs))
    step.optimizer_step(1.234e-3)
    assert all(g["lr"] is step.optimizer.param_groups[0]["lr"] for g in step.optimizer.param_groups)
    assert float(step.optimizer.param_groups[0]["lr"]) == pytest.approx(1.234e-3)


def test_non_finite_loss_is_reported_with_its_step_and_its_update_is_not_applied():
    from mae_fast.metrics import Meter, NonFiniteLoss

    step = make_step()
    images = torch.randn_like(step.inputs)
    for i in range(3):
        batch = images.clone()
        if i == 1:
            batch[0, 0, 0, 0] = float("nan")
        before = [p.detach().clone() for p in step.params]
        step.run(batch)
        step.optimizer_step(1e-3)
        changed = [not torch.equal(a, p) for a, p in zip(before, step.params)]
        assert all(torch.isfinite(p).all() for p in step.params)
        assert not any(changed) if i == 1 else any(changed)  # the fused AdamW skipped the non-finite step
    losses, gnorms, _ = step.read_metrics()
    assert math.isnan(losses[1]) and not math.isfinite(gnorms[1]) and math.isfinite(gnorms[2])
    meter = Meter(effective_batch=8, steps_per_epoch=10, total_steps=10)
    with pytest.raises(NonFiniteLoss, match="at step 12"):
        meter.update(first_step=10, losses=losses, gnorms=gnorms, lr=1e-3, data_wait_s=0.0)


def test_compiled_optimizer_equals_fused_adamw():
    """misc.compile_optimizer: grad norm + clip + foreach/capturable AdamW under torch.compile
    gives the parameters of the eager fused AdamW, with a changing lr and no recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    steps = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("mae_vit_tiny_patch8")
        opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU, compiled=compiled)
        steps.append(
            TrainStep(
                model,
                opt,
                micro_batch=8,
                accum_steps=1,
                device=CPU,
                options=StepOptions(
                    mask_ratio=0.75,
                    gradient_clip=0.5,
                    compile=False,
                    compile_backend=counter,
                    compile_optimizer=compiled,
                ),
            )
        )
    g = torch.Generator().manual_seed(1)
    batches = [[torch.randn(8, 3, 32, 32, generator=g)] for _ in range(4)]
    results, frames = [], []
    for step in steps:
        torch.manual_seed(5)
        losses = run_steps(step, batches[:1], [1e-3])
        frames.append(counter.frame_count)  # the eager step compiles nothing; the compiled one its graphs
        losses += run_steps(step, batches[1:], [5e-4, 2e-3, 1e-4])  # a changing lr must not recompile
        results.append((losses, step.gnorm_ring[:3].clone()))
    (l0, g0), (l1, g1) = results
    assert frames[0] == 0 and 0 < frames[1] == counter.frame_count
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert torch.allclose(g0, g1, rtol=1e-5)
    for (n, p), q in zip(steps[0].model.named_parameters(), steps[1].model.parameters()):
        assert torch.allclose(drop_key_bias(n, p), drop_key_bias(n, q), atol=1e-6), n


def test_compile_optimizer_refuses_the_fused_optimizer():
    model = build_model("mae_vit_tiny_patch8")
    with pytest.raises(ValueError, match="compiled=True"):
        TrainStep(
            model,
            build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU),
            micro_batch=2,
            accum_steps=1,
            device=CPU,
            options=StepOptions(mask_ratio=0.75, gradient_clip=0.0, compile=False, compile_optimizer=True),
        )


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("attention", ["math", "flash"])
def test_attention_kernel_choice_gives_the_same_loss_and_gradients(attention, compiled):
    """misc.attention pins the SDPA kernel of every block, also when gradient checkpointing recomputes
    a block in the backward; the numbers stay those of auto."""
    torch._dynamo.reset()
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    results = []
    for kernel in ("auto", attention):
        torch.manual_seed(0)
        model = build_model("mae_vit_tiny_patch8", grad_checkpointing=True, attention=kernel)
        forward = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        loss, _, _ = forward(imgs, 0.75, noise)
        loss.backward()
        results.append((loss.detach(), model.blocks[0].attn.qkv.weight.grad))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5) and torch.allclose(g0, g1, rtol=1e-4, atol=1e-7)


def test_a_pinned_attention_kernel_is_really_used():
    """The memory-efficient kernel has no CPU implementation: pinning it must fail here, so the pin is honoured."""
    model = build_model("mae_vit_tiny_patch8", attention="efficient")
    with pytest.raises(RuntimeError, match="No (available kernel|viable backend)"):
        model(torch.randn(2, 3, 32, 32), 0.75)


def test_resuming_keeps_the_optimizer_kind():
    """A checkpoint of a fused-AdamW run resumed with misc.compile_optimizer (and back): the optimizer
    keeps its own kernel flags and continues from the saved moments."""
    from mae_fast.optim import load_optimizer_state

    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch8")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    fused = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU)
    fused.step()
    compiled = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU, compiled=True)
    load_optimizer_state(compiled, fused.state_dict())
    assert all(g["capturable"] and g["foreach"] and not g["fused"] for g in compiled.param_groups)
    p0 = next(model.parameters())
    assert torch.equal(compiled.state[p0]["exp_avg"], fused.state[p0]["exp_avg"])
    torch.compile(compiled.step, backend="aot_eager")()  # capturable runs on the CPU only when compiled
    back = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU)
    load_optimizer_state(back, compiled.state_dict())
    assert all(g["fused"] and not g["capturable"] for g in back.param_groups)
    back.step()
    assert float(back.state[p0]["step"]) == 3


def test_busy_timer_sums_its_windows_and_resets(monkeypatch):
    """Only the time inside start/stop windows counts, however many windows a log interval holds."""
    from mae_fast import step as step_module

    clock = iter(range(1000))  # a fake host clock: each reading one second later
    monkeypatch.setattr(step_module.time, "perf_counter", lambda: float(next(clock)))
    busy = step_module.BusyTimer(CPU)
    for _ in range(100):  # more windows than any fixed capacity: the timer grows
        busy.start()  # reads t
        busy.stop()  # reads t + 1: one second inside the window
        next(clock)  # a second outside any window: not counted
    assert busy.take_s() == 100.0
    assert busy.take_s() == 0.0
    busy.stop()  # a stop without a start records nothing
    assert busy.take_s() == 0.0


def test_bf16_precision_keeps_fp32_masters_and_trains_like_fp32():
    """misc.precision bf16: a bf16 copy runs the step, gradients accumulate in fp32 on the fp32 model (the
    master that the optimizer updates and checkpoints save), and the copy is the masters rounded to bf16."""
    steps = []
    for precision in ("amp", "bf16"):  # amp is plain fp32 on the CPU
        torch.manual_seed(0)
        model = build_model("mae_vit_tiny_patch8")
        opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU)
        steps.append(
            TrainStep(
                model,
                opt,
                micro_batch=4,
                accum_steps=2,
                device=CPU,
                options=StepOptions(mask_ratio=0.75, gradient_clip=1.0, compile=False, precision=precision),
            )
        )
    g = torch.Generator().manual_seed(1)
    batches = [[torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] for _ in range(4)]
    lrs = [1e-3] * 4
    torch.manual_seed(5)
    l_fp32 = run_steps(steps[0], batches, lrs)
    torch.manual_seed(5)
    l_bf16 = run_steps(steps[1], batches, lrs)
    assert l_bf16 == pytest.approx(l_fp32, rel=3e-2)
    bf16 = steps[1]
    assert bf16.compute is not bf16.model
    for (name, master), copy in zip(bf16.model.named_parameters(), bf16.compute.parameters()):
        assert master.dtype == torch.float32 and copy.dtype == torch.bfloat16, name
        assert torch.equal(copy, master.to(torch.bfloat16)), name
        if master.requires_grad:
            assert master.grad is not None and not master.grad.any(), name  # kept allocated, zeroed
            assert copy.grad is None, name
    assert all(v.dtype == torch.float32 for v in bf16.model.state_dict().values())  # what checkpoints hold


def test_bf16_precision_accumulates_micro_batches_in_fp32():
    """Each micro-step's bf16 gradients are added into the fp32 accumulators: after one micro-step they are
    bf16 values; after three, sums that bf16 cannot hold (a bf16 accumulation would have rounded them)."""
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch8")
    step = TrainStep(
        model,
        build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU),
        micro_batch=2,
        accum_steps=3,
        device=CPU,
        options=StepOptions(mask_ratio=0.75, gradient_clip=0.0, compile=False, precision="bf16"),
    )

    def bf16_representable(t: torch.Tensor) -> bool:
        return torch.equal(t, t.to(torch.bfloat16).float())

    for i in range(3):
        step.run(torch.randn_like(step.inputs))
        assert all(p.grad is None for p in step._compute_params)  # moved out after every micro-step
        if i == 0:
            assert all(bf16_representable(p.grad) for p in step.params)
    assert not all(bf16_representable(p.grad) for p in step.params)


def test_bf16_precision_compiles_to_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch8")
    step = TrainStep(
        model,
        build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU),
        micro_batch=4,
        accum_steps=1,
        device=CPU,
        options=StepOptions(mask_ratio=0.75, gradient_clip=1.0, compile_backend=counter, precision="bf16"),
    )
    batches = [[torch.randn(4, 3, 32, 32)] for _ in range(3)]
    losses = run_steps(step, batches, [1e-3, 2e-3, 5e-4])
    assert counter.frame_count == 1 and all(math.isfinite(v) for v in losses)


def test_bf16_precision_is_refused_with_several_processes():
    model = build_model("mae_vit_tiny_patch8")
    with pytest.raises(ValueError, match="one process"):
        TrainStep(
            model,
            build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), CPU),
            micro_batch=2,
            accum_steps=1,
            device=CPU,
            distributed=True,
            options=StepOptions(mask_ratio=0.75, gradient_clip=0.0, compile=False, precision="bf16"),
        )


@pytest.mark.parametrize(
    "switch",
    [
        ["model.embed_kept_only=true"],
        ["misc.compile=true", "misc.compile_optimizer=true"],
        ["misc.attention=math"],
        ["misc.precision=bf16"],
        ["model.grad_checkpointing=true"],
        ["misc.high_priority_stream=true"],
    ],
    ids=lambda s: s[-1],
)
def test_every_performance_switch_trains_as_the_plain_step(switch):
    """Each switch (bench-step --variant) against the plain step, same weights, batches and masks, on the CPU
    (eager unless the switch needs the compiler); the GPU version is in test_gpu.py."""
    from helpers import config_step_losses, tiny_step_config

    plain = config_step_losses(tiny_step_config("misc.compile=false"), CPU)
    switched = config_step_losses(tiny_step_config("misc.compile=false", *switch), CPU)
    assert all(math.isfinite(v) for v in switched) and switched == pytest.approx(plain, rel=3e-2)
