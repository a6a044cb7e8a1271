"""Run mae-fast command lines one after another in this process, as the `mae-fast` script runs one (cli.main's
return value is the exit status; argparse's SystemExit too), and print, as JSON, per command line: the exit
status, its stdout and stderr, the traceback of any exception that escaped, and every file it opened (from the
interpreter's "open" audit event, which builtins.open, io.open and os.open raise before they try; resolved
through links).

The fuzz tests start one of these per format, with their table of command lines on stdin: a subprocess each
would pay the imports (torch, DALI) again for every tampering.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback

opened: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes)):
        path = args[0] if isinstance(args[0], str) else args[0].decode(errors="replace")
        opened.append(os.path.realpath(path))  # where it leads: a link inside the root to a file outside counts


def run(argv: list[str]) -> dict:
    """One command line; ["!", program, ...] runs a program between them instead (a test's set-up step)."""
    from mae_fast.cli import main

    if argv[:1] == ["!"]:
        done = subprocess.run(argv[1:], capture_output=True, text=True)
        return {"argv": argv, "code": done.returncode, "stdout": done.stdout, "stderr": done.stderr, "traceback": "",
                "opened": []}  # fmt: skip

    opened.clear()
    out, err, escaped = io.StringIO(), io.StringIO(), ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code, escaped = 1, traceback.format_exc()
    return {"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "traceback": escaped,
            "opened": list(opened)}  # fmt: skip


if __name__ == "__main__":
    sys.addaudithook(_audit)
    results = [run(argv) for argv in json.load(sys.stdin)]
    print("RESULTS " + json.dumps(results))  # one line, told apart from anything a library writes to fd 1
