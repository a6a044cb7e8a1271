"""The synthetic loader: fixed shapes, deterministic per (seed, epoch, batch), exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from mae_fast.pipelines.synthetic import SyntheticLoader


def test_shapes_determinism_epochs_and_resume():
    def make(seed: int = 0) -> SyntheticLoader:
        return SyntheticLoader(4, 16, batches_per_epoch=3, dtype=torch.float16, seed=seed)

    a = make()
    assert len(a) == 3
    e0 = list(a)
    assert len(e0) == 3 and all(b.shape == (4, 3, 16, 16) and b.dtype == torch.float16 for b in e0)
    x = torch.cat(e0).float()
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1
    assert not torch.equal(e0[0], e0[1])
    e1 = list(a)  # the next epoch without set_epoch
    assert a.epoch == 1 and not torch.equal(e0[0], e1[0])

    b = make()
    assert all(torch.equal(p, q) for p, q in zip(e0, list(b), strict=True))
    assert not torch.equal(e0[0], next(iter(make(seed=1))))

    c = make()
    c.set_epoch(1)
    it = iter(c)
    next(it)
    state = json.loads(json.dumps(c.state()))
    d = make()
    d.load_state(state)
    d.set_epoch(1)
    assert all(torch.equal(p, q) for p, q in zip(e1[1:], list(d), strict=True))
    with pytest.raises(ValueError, match="seed"):
        make(seed=2).load_state(state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda():
    loader = SyntheticLoader(2, 8, batches_per_epoch=2, device="cuda")
    cpu = SyntheticLoader(2, 8, batches_per_epoch=2)
    batches = list(loader)
    assert all(b.device.type == "cuda" for b in batches)
    assert not torch.equal(batches[0].cpu(), batches[1].cpu())
    assert batches[0].shape == next(iter(cpu)).shape
