"""A config file (configs/demo.yaml), tampered: each a `mae-fast train` of its own copy, all in one driver process.
Each ends with one `error:` line naming the file and the key, exit 2, no traceback, before anything is built."""

from __future__ import annotations

import re

import pytest
from fuzz_helpers import ROOT, assert_one_error, run_cli

DEMO = (ROOT / "configs/demo.yaml").read_text()


def _cut_after(word):
    return lambda t: t[: t.index(word) + len(word)]


def _error_at_end_of(word: str) -> str:
    """YAML's error once demo.yaml is cut after `word`: it points at the line where the word ends."""
    return f"not valid YAML/JSON at line {DEMO[: DEMO.index(word) + len(word)].count(chr(10)) + 1}"


def _sub(pattern, repl):
    def tamper(t):
        out, n = re.subn(pattern, repl, t, count=1, flags=re.M)
        assert n == 1, pattern
        return out

    return tamper


CASES = {  # name: (the file's new text or bytes from demo.yaml's, what the error line names)
    "empty": (lambda t: "", "holds no settings"),
    "comments only": (lambda t: "# nothing\n", "holds no settings"),
    "binary": (lambda t: bytes(range(256)), "not UTF-8"),
    "Latin-1": (lambda t: t.replace("tiny", "tïny").encode("latin-1"), "not UTF-8"),
    "invalid YAML": (lambda t: t + "\nmodel: [\n", "not valid YAML/JSON at line"),
    "a list": (lambda t: "- model\n", "the top level must be a mapping"),
    "a number": (lambda t: "5\n", "the top level must be a mapping"),
    "truncated in a section name": (_cut_after("optimiz"), _error_at_end_of("optimiz")),
    "truncated in a key": (_cut_after("  weight_dec"), _error_at_end_of("  weight_dec")),
    "truncated in another key": (_cut_after("  num_work"), _error_at_end_of("  num_work")),
    "truncated in the last section": (_cut_after("\nmis"), _error_at_end_of("\nmis")),
    "mask_ratio 2": (_sub(r"mask_ratio: .*$", "mask_ratio: 2"), "model.mask_ratio"),
    "epochs -1": (_sub(r"^  epochs: \d+$", "  epochs: -1"), "schedule.epochs"),
    "lr NaN": (_sub(r"  lr: .*$", "  lr: .nan"), "optimization.lr"),
    "lr inf": (_sub(r"  lr: .*$", "  lr: .inf"), "optimization.lr"),
    "batch_size 0": (_sub(r"batch_size: 32", "batch_size: 0"), "optimization.batch_size"),
    "batch_size huge": (_sub(r"batch_size: 32", "batch_size: 1000000000000"), "optimization.batch_size"),
    "batch_size as text": (_sub(r"batch_size: 32", "batch_size: many"), "optimization.batch_size"),
    "input_size 63": (_sub(r"input_size: 64", "input_size: 63"), "data.input_size"),
    "num_workers negative": (_sub(r"num_workers: 2", "num_workers: -2"), "data.num_workers"),
    "num_workers huge": (_sub(r"num_workers: 2", "num_workers: 1000000000"), "data.num_workers"),
    "keep_last_n negative": (_sub(r"keep_last_n: 2", "keep_last_n: -1"), "checkpointing.keep_last_n"),
    "print_freq 0": (_sub(r"print_freq: 8", "print_freq: 0"), "logging.print_freq"),
    "seed -1": (_sub(r"seed: 0", "seed: -1"), "misc.seed"),
    "a bogus device": (_sub(r"device: auto", "device: bogus"), "misc.device"),
    "an unknown model": (_sub(r"type: mae_vit_tiny_patch8", "type: resnet50"), "model.type"),
    "a model type as a list": (_sub(r"type: mae_vit_tiny_patch8", "type: [a, b]"), "model.type"),
    "an unknown key": (_sub(r"^  mask_ratio", "  mask_ratoi"), "model.mask_ratoi"),
    "an unknown section": (lambda t: t + "\nextras: {a: 1}\n", "extras"),
    "a section as a list": (_sub(r"^schedule:", "schedule: [1]\nx:"), "schedule"),
    "output_dir as a list": (_sub(r"output_dir: .*$", "output_dir: [1]"), "logging.output_dir"),
    "save_freq_epochs negative": (_sub(r"save_freq_epochs: 10", "save_freq_epochs: -10"), "save_freq_epochs"),
    "norm_pix_loss as text": (_sub(r"norm_pix_loss: false", "norm_pix_loss: maybe"), "model.norm_pix_loss"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_config")
    paths = {}
    for i, (name, (change, _)) in enumerate(CASES.items()):
        path = tmp / f"case{i}.yaml"
        new = change(DEMO)
        path.write_bytes(new if isinstance(new, bytes) else new.encode())
        paths[name] = path
    folder = tmp / "a-folder.yaml"
    folder.mkdir()
    paths["a folder"] = folder
    # were a tampered config valid, it would stop at this data path, not train
    safe = ["--set", "data.data_path=/nonexistent", "--set", "data.make_sample=false"]
    results = run_cli([["train", str(p), *safe] for p in paths.values()], cwd=tmp)
    return {name: (paths[name], r) for name, r in zip(paths, results, strict=True)}


@pytest.mark.parametrize("case", [*CASES, "a folder"])
def test_a_bad_config_is_one_error_line(runs, case):
    path, r = runs[case]
    assert_one_error(r, str(path), CASES.get(case, (None, "is a folder"))[1], codes=(2,))
