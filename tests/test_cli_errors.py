"""Bad input, driven through the real command line (a subprocess each): one `error:` line that names the file,
key or value, exit 1 or 2, and never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")
# billion laughs: 9**9 strings once expanded, as the value of a real key
BOMB = """model:
  type: [&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"], &l1 [*l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0], &l2 [*l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1], &l3 [*l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2], &l4 [*l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3], &l5 [*l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4], &l6 [*l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5], &l7 [*l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6], &l8 [*l7, *l7, *l7, *l7, *l7, *l7, *l7, *l7, *l7]]
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "list.yaml").write_text("- model\n- data\n")
    (tmp / "latin1.yaml").write_bytes("model:\n  type: caf\xe9\n".encode("latin-1"))
    (tmp / "bomb.yaml").write_text(BOMB)
    (tmp / "a-file").write_text("")
    from mae_fast.model import build_model

    sd = build_model("mae_vit_tiny_patch8").state_dict()
    torch.save({"model": {**sd, "norm.weight": torch.ones(7)}}, tmp / "shape.pt")
    return tmp


CASES = {
    "zero-byte checkpoint (visualize)": (["visualize", "{t}/empty.pt", "--images", "x.jpg"], 1, "{t}/empty.pt is not a readable checkpoint: the file is empty"),
    "zero-byte checkpoint (export)": (["export", "{t}/empty.pt", "--out", "{t}/e.safetensors"], 1, "{t}/empty.pt is not a readable checkpoint"),
    "wrong tensor shape": (["export", "{t}/shape.pt", "--out", "{t}/e.safetensors"], 1, "the weights do not fit mae_vit_tiny_patch8: size mismatch for norm.weight"),
    "top level is a list": (["train", "{t}/list.yaml"], 2, "{t}/list.yaml: the top level must be a mapping"),
    "config not UTF-8": (["train", "{t}/latin1.yaml"], 2, "{t}/latin1.yaml: not UTF-8 text"),
    "alias bomb": (["train", "{t}/bomb.yaml"], 2, "{t}/bomb.yaml: model.type: expected a string, got [['lol', 'lol', 'lol', 'lol', ...], [[...]"),
    "seed -1": (["train", DEMO, "--set", "misc.seed=-1"], 2, "--set misc.seed=-1: misc.seed: must be in [0, 2**32 - 1]"),
    "huge prefetch": (["train", DEMO, "--set", "data.prefetch=100000"], 2, "data.prefetch: must be in [1, 32] batches"),
    "--set typo": (["train", DEMO, "--set", "optimization.lrr=1"], 2, "--set optimization.lrr=1: optimization.lrr: unknown key; did you mean optimization.lr?"),
    "unwritable checkpoint_dir": (["train", DEMO, "--set", "checkpointing.checkpoint_dir={t}/a-file/c"], 2, "checkpointing.checkpoint_dir: cannot write to {t}/a-file/c"),
    "unwritable export": (["export", "{t}/shape.pt", "--out", "{t}/a-file/e.safetensors"], 2, "--out {t}/a-file/e.safetensors: cannot write into {t}/a-file: it is a file"),
    "negative sample count": (["make-sample-data", "{t}/s", "--n", "-5"], 2, "argument --n: must be in [1, 1000000], got -5"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(files, case):
    args, code, message = CASES[case]
    args = [a.replace("{t}", str(files)) for a in args]
    run = subprocess.run(
        [sys.executable, "-m", "mae_fast", *args], capture_output=True, text=True, cwd=files, timeout=120
    )
    assert run.returncode == code, run.stderr
    assert "Traceback" not in run.stderr and message.replace("{t}", str(files)) in run.stderr, run.stderr
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
    assert len(line) < 700  # a short excerpt, whatever the value
