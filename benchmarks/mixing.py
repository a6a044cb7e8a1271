"""How well batches mix on class-sorted shards: mae-fast's epoch order against webdataset and a global shuffle.

Class-sorted shards (a data set converted class by class, common for ImageNet conversions) are the hard case
for a shard reader: a batch drawn from few shards holds few classes. This writes 40 shards of 128 samples,
16 classes of 320 samples in class order (so a shard holds one or two classes), and counts the distinct
shards and classes in each batch of 32 over one epoch, for a shuffle buffer of 64 and of 1024 samples:

    global      a permutation of all samples (the folder loader; the ideal)
    webdataset  webdataset 1.0's shard shuffle + shuffle(buffer), read from the real tars; and with a buffer
                of 2 x buffer: the memory mae-fast's reader holds (the block being fed and the next one)
    mae-fast    shards.epoch_plan with LANES lanes (now), and with 1 lane (the order before lanes)

Run: python benchmarks/mixing.py [--json PATH]; prints a Markdown table (the README's mixing table).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from mae_fast.pipelines import shards

SHARDS, PER_SHARD, CLASSES, BATCH = 40, 128, 16, 32
N = SHARDS * PER_SHARD
CLASS_OF = np.arange(N) // (N // CLASSES)  # class-sorted: sample i (in shard i // PER_SHARD) has class CLASS_OF[i]


def mixing(batches: np.ndarray) -> tuple[float, float]:
    """Mean distinct shards and classes per batch; batches: (L, B) global sample indices."""
    return (
        float(np.mean([len(set(b // PER_SHARD)) for b in batches])),
        float(np.mean([len(set(CLASS_OF[b])) for b in batches])),
    )


def global_shuffle(seed: int = 0) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(N)
    return order[: N // BATCH * BATCH].reshape(-1, BATCH)


def mae_fast(buffer: int, lanes: int, seed: int = 0) -> np.ndarray:
    saved, shards.LANES = shards.LANES, lanes
    try:
        plan = shards.epoch_plan(
            np.full(SHARDS, PER_SHARD), BATCH, seed=seed, epoch=0, shard_id=0, num_shards=1, block_size=buffer
        )
    finally:
        shards.LANES = saved
    return plan.order


def write_tars(folder: Path) -> list[str]:
    import webdataset as wds

    with wds.ShardWriter(str(folder / "part-%04d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(N):
            sink.write({"__key__": f"{i:06d}", "cls": int(CLASS_OF[i])})
    return [str(p) for p in sorted(folder.glob("part-*.tar"))]


def webdataset(urls: list[str], buffer: int, seed: int = 0) -> np.ndarray:
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False).shuffle(buffer, seed=seed)
    keys = [int(s["__key__"]) for s in ds]
    return np.array(keys[: len(keys) // BATCH * BATCH]).reshape(-1, BATCH)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_tars(Path(tmp))
        for buffer in (64, 1024):
            rows += [
                ("global shuffle", {"buffer": buffer, "order": global_shuffle()}),
                (f"webdataset, shuffle({buffer})", {"buffer": buffer, "order": webdataset(urls, buffer)}),
                (
                    f"webdataset, shuffle({2 * buffer}): mae-fast's memory",
                    {"buffer": buffer, "order": webdataset(urls, 2 * buffer)},
                ),
                ("mae-fast, 1 lane (before)", {"buffer": buffer, "order": mae_fast(buffer, 1)}),
                (
                    f"mae-fast, {min(shards.LANES, buffer // shards.MIN_RUN)} lanes (now)",
                    {"buffer": buffer, "order": mae_fast(buffer, shards.LANES)},
                ),
            ]
    print(f"{SHARDS} class-sorted shards of {PER_SHARD} samples, {CLASSES} classes, batch {BATCH}\n")
    print("| order | shuffle buffer | shards per batch | classes per batch |\n| --- | ---: | ---: | ---: |")
    results = []
    for name, r in rows:
        s, c = mixing(r["order"])
        print(f"| {name} | {r['buffer']} | {s:.2f} | {c:.2f} |")
        results.append({"order": name, "buffer": r["buffer"], "shards_per_batch": s, "classes_per_batch": c})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
