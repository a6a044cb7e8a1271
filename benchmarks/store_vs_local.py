"""bench-loader's store / local ratio on this machine: the same shards read by DALI from a local folder, from an
S3-API server (moto) and from nginx, each started here on 127.0.0.1, in one run.

    python benchmarks/store_vs_local.py [--images 512] [--batches 30] [--json PATH]

A localhost server measures what mae-fast adds on the way (requests, copies, the reader's overlap), not a
network: a real bucket adds latency that the reader's read-ahead and its 8 requests in flight are there to hide.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import CREDENTIALS, nginx, s3_server, upload_folder  # noqa: E402

from mae_fast.bench import bench_loader  # noqa: E402
from mae_fast.config import load_config  # noqa: E402
from mae_fast.pipelines.make_shards import make_shards  # noqa: E402
from mae_fast.pipelines.sample_data import make_sample_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    os.environ.update(CREDENTIALS)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_sample_data(f"{tmp}/sample", n=args.images)
        shards = f"{tmp}/shards"
        make_shards(folder, shards, shard_bytes=4 << 20, workers=2, progress=False)
        cfg = load_config(ROOT / "configs/bench_cpu.yaml", [f"data.data_path={shards}", "data.shuffle_buffer=256"])
        with s3_server() as endpoint:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            upload_folder(endpoint, Path(shards), "bucket", "shards")
            out["s3"] = bench_loader(cfg, backend="dali", batches=args.batches, store="s3://bucket/shards")
        with nginx(Path(shards)) as url:
            out["http"] = bench_loader(cfg, backend="dali", batches=args.batches, store=f"{url}/")
    print("\n| store | local img/s | store img/s | store / local | store MB/s | requests/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in out.items():
        local, store = r["results"]["shards"], r["results"]["store"]
        print(
            f"| {name} | {local['img_s']:,.0f} | {store['img_s']:,.0f} | {r['ratio_store_over_local']:.2f}x | "
            f"{store['MB_s']:,.1f} | {store['requests_per_s']:,.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
