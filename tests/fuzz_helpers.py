"""What the fuzz tests share: run a table of mae-fast command lines in one subprocess (tests/cli_driver.py), and
the rule every bad input must end by."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argvs: list[list[str]], cwd: Path, wrap: list[str] | None = None, timeout: float = 300) -> list[dict]:
    """Each command line's result (code, stdout, stderr, traceback, opened files), from one driver process;
    `wrap` runs the driver under another command (e.g. unshare)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [*(wrap or []), sys.executable, str(ROOT / "tests/cli_driver.py")]
    proc = subprocess.run(
        cmd, input=json.dumps(argvs), capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")]
    return json.loads(line[len("RESULTS ") :])


def assert_one_error(result: dict, *names: str, codes: tuple[int, ...] = (1, 2)) -> str:
    """The command failed as bad input must: exit 1 or 2, nothing escaped, no traceback printed, and exactly one
    `error:` line, its last, which names every one of `names` (the file, the field). Returns that line."""
    assert not result["traceback"], result["traceback"]
    assert result["code"] in codes, result
    assert "Traceback" not in result["stderr"], result["stderr"]
    errors = [x for x in result["stderr"].splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and result["stderr"].rstrip().endswith(errors[0]), result["stderr"]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def opened_under(result: dict, folder: Path) -> list[str]:
    """The files the command opened inside `folder` (e.g. a sentinel folder outside the data root)."""
    inside = str(folder.resolve()) + os.sep
    return [p for p in result["opened"] if p.startswith(inside)]
