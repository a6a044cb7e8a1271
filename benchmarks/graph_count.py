"""How many graphs the compiled step makes: a short synthetic `train` run on the CPU (tiny model,
2 micro-batches per step), then torch._dynamo's counters. A refactor must leave these unchanged.

    python benchmarks/graph_count.py [--set KEY=VALUE ...]
"""

import argparse
import json
import tempfile

from torch._dynamo.utils import counters

from mae_fast.config import config_from_dict
from mae_fast.train import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = {
            "model": {"type": "mae_vit_tiny_patch8"},
            "optimization": {"batch_size": 8, "micro_batch_size": 4},
            "schedule": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 3},
            "data": {"backend": "synthetic", "input_size": 32, "synthetic_images": 24},
            "checkpointing": {"checkpoint_dir": f"{tmp}/ckpt", "save_freq_epochs": 1, "save_freq_steps": 0},
            "logging": {"output_dir": f"{tmp}/out", "print_freq": 2, "dashboard": "off"},
            "misc": {"device": "cpu"},
        }
        train(config_from_dict(base, args.overrides), log=lambda m: None)
    stats = {k: v for k, v in counters["stats"].items() if k in ("unique_graphs", "calls_captured", "frames_ok")}
    print(json.dumps({"graphs": stats, "graph_breaks": sum(counters["graph_break"].values())}))


if __name__ == "__main__":
    main()
