"""A checkpoint (model.pt), tampered: each a `mae-fast export` of its own file, all in one driver process. Each
ends with one `error:` line naming the file (and the field, where one is wrong), exit 1, no traceback, and
nothing written to --out; NaN or inf weights are one line saying the weights are not finite."""

from __future__ import annotations

import math

import pytest
import torch
from fuzz_helpers import assert_one_error, run_cli
from helpers import tiny_step_config

from mae_fast.checkpoint import FORMAT_VERSION, load_checkpoint
from mae_fast.model import build_model


class Code:  # a pickled instance of a class: what a safe load refuses to run
    pass


def _with(**fields):
    return lambda c: {**c, **fields}


def _model(change):
    def tamper(c):
        sd = {k: v.clone() for k, v in c["model"].items()}
        change(sd)
        return {**c, "model": sd}

    return tamper


def _nan(sd):
    sd["blocks.0.attn.qkv.weight"][0, 0] = math.nan


def _inf(sd):
    sd["norm.weight"][3] = -math.inf


CASES = {  # name: (the object saved, or the bytes written, from the valid ones; what the error line names)
    "an empty file": (b"", "the file is empty"),
    "truncated to a third": ("third", "truncated or damaged"),
    "truncated to a half": ("half", "truncated or damaged"),
    "truncated by 10 bytes": ("ten", "not a readable checkpoint"),
    "random bytes": (bytes(range(256)) * 4, "not a PyTorch checkpoint"),
    "a JPEG": (b"\xff\xd8\xff\xe0" + bytes(100), "a JPEG image"),
    "text": (b"model: weights\n", "not a PyTorch checkpoint"),
    "a list": (lambda c: [1, 2], "holds a list"),
    "a tensor": (lambda c: torch.zeros(3), "holds a Tensor"),
    "code to run": (lambda c: {**c, "extra": Code()}, "Python objects other than tensors"),
    "model as text": (_with(model="weights"), "model: expected a state dict"),
    "a model value that is not a tensor": (_model(lambda sd: sd.update({"norm.weight": [1.0, 2.0]})), "model:"),
    "step as text": (_with(step="10"), "step: expected int"),
    "step negative": (_with(step=-1), "step: must be >= 0"),
    "version as text": (_with(version="1"), "version: expected int"),
    "a newer version": (_with(version=FORMAT_VERSION + 1), "written by a newer mae-fast"),
    "config as a list": (_with(config=[1]), "config: expected dict"),
    "norm_pix_loss as text": (
        lambda c: {**c, "config": {**c["config"], "model": {"norm_pix_loss": "yes"}}},
        "config.model.norm_pix_loss: expected bool",
    ),  # fmt: skip
    "rng as text": (_with(rng="state"), "rng: expected list"),
    "data states as text": (_with(data=["x"]), "data: expected one state"),
    "optimizer as a list": (_with(optimizer=[]), "optimizer: expected dict"),
    "no model": (lambda c: {k: v for k, v in c.items() if k != "model"}, "holds no state dict of tensors"),
    "a weight of another shape": (_model(lambda sd: sd.update({"norm.weight": torch.ones(7)})), "do not fit"),
    "NaN weights": (_model(_nan), "the weights are not finite (1 tensors hold NaN or inf: blocks.0.attn.qkv.weight)"),
    "inf weights": (_model(_inf), "the weights are not finite"),
    "a folder without model.pt": ("folder", "is a folder without a model.pt"),
    "missing": ("missing", "does not exist"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_ckpt")
    torch.manual_seed(0)
    valid = {
        "format": "mae-fast",
        "version": FORMAT_VERSION,
        "model": build_model("mae_vit_tiny_patch8").state_dict(),
        "config": tiny_step_config().to_dict(),
        "step": 10,
        "optimizer": {"state": {}, "param_groups": []},
        "rng": [{}],
        "data": [{}],
        "derived": {},
    }
    torch.save(valid, tmp / "valid.pt")
    raw = (tmp / "valid.pt").read_bytes()
    paths = {}
    for i, (name, (change, _)) in enumerate(CASES.items()):
        path = tmp / f"case{i}.pt"
        if callable(change):
            torch.save(change(valid), path)
        elif isinstance(change, bytes):
            path.write_bytes(change)
        elif change == "folder":
            path.mkdir()
        elif change != "missing":
            path.write_bytes(raw[: {"third": len(raw) // 3, "half": len(raw) // 2, "ten": len(raw) - 10}[change]])
        paths[name] = path
    argvs = [["export", str(paths[name]), "--out", str(tmp / f"out{i}/e.safetensors")] for i, name in enumerate(CASES)]
    results = run_cli(argvs, cwd=tmp)
    return tmp, {name: (paths[name], r) for name, r in zip(CASES, results, strict=True)}


def test_the_untampered_checkpoint_loads(runs):
    tmp, _ = runs
    assert load_checkpoint(tmp / "valid.pt")["step"] == 10


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_checkpoint_is_one_error_line(runs, case):
    tmp, found = runs
    path, r = found[case]
    assert_one_error(r, str(path), CASES[case][1], codes=(1,))
    i = list(CASES).index(case)
    assert not (tmp / f"out{i}/e.safetensors").exists()
