"""Does the live dashboard slow training? Train the same run with the dashboard on and off, in one
process, and report the throughput ratio. Redraw every step (print_freq=1) is the worst case.

    python benchmarks/dashboard_overhead.py [--config configs/demo.yaml] [--steps 200] [--print-freq 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_fast.config import load_config  # noqa: E402
from mae_fast.train import train  # noqa: E402


def measure(config: str, dashboard: str, steps: int, print_freq: int, extra: list[str]) -> float:
    """Median img/s of the run's log intervals after the first two."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            config,
            [
                f"logging.dashboard={dashboard}",
                f"logging.print_freq={print_freq}",
                f"logging.output_dir={tmp}/out",
                f"checkpointing.checkpoint_dir={tmp}/ckpt",
                "checkpointing.save_freq_epochs=0",
                "checkpointing.save_freq_steps=0",
                *extra,
            ],
        )
        sink = Path(tmp) / "console.txt"
        with open(sink, "w") as f, contextlib.redirect_stdout(f):
            snaps = []
            train(cfg, max_steps=steps, on_log=lambda snap, losses: snaps.append(snap))
        written = sink.stat().st_size
    print(f"dashboard {dashboard}: {written:,} bytes written to the console", file=sys.stderr)
    # leave out the first interval (compilation, warm-up)
    rates = [s.samples_per_s for s in snaps[2:]]
    return statistics.median(rates)


def main() -> None:
    os.environ["FORCE_COLOR"] = "1"  # Rich draws the live dashboard as on a terminal, into a file
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--print-freq", type=int, default=1)
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=["data.backend=synthetic", "misc.compile=false", "evaluation=null"],
    )
    p.add_argument("--json", default=None)
    a = p.parse_args()
    order = ["off", "on", "off", "on"]  # interleaved, so drift hits both
    rates: dict[str, list[float]] = {"on": [], "off": []}
    for mode in order:
        rates[mode].append(measure(a.config, mode, a.steps, a.print_freq, a.extra))
    on, off = statistics.mean(rates["on"]), statistics.mean(rates["off"])
    out = {
        "dashboard_on_img_s": on,
        "dashboard_off_img_s": off,
        "ratio_on_over_off": on / off,
        "print_freq": a.print_freq,
        "steps": a.steps,
        "config": a.config,
        "overrides": a.extra,
    }
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
