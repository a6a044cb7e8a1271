"""Which object-store client pipelines/store.py uses, measured: obstore against fsspec (s3fs, fsspec's HTTP)
reading the same 64 MB object in 4 MB ranges from an S3-API server (moto) and from nginx, both on 127.0.0.1.

    pip install s3fs && python benchmarks/store_clients.py

Best of 3 per client; MB/s and requests per second. A localhost server measures the client's own cost.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import CREDENTIALS, nginx, s3_server, upload_folder  # noqa: E402

SIZE, RANGE = 64 << 20, 4 << 20


def best(name: str, read, data: bytes, starts: list[int]) -> None:
    seconds = []
    for _ in range(3):
        t = time.perf_counter()
        got = read()
        seconds.append(time.perf_counter() - t)
        assert b"".join(bytes(g) for g in got) == data, name
    s = min(seconds)
    print(f"| {name} | {SIZE / s / 1e6:,.0f} | {len(starts) / s:,.0f} |")


def main() -> None:
    import fsspec
    import obstore
    from obstore.store import HTTPStore, S3Store

    os.environ.update(CREDENTIALS)
    starts = list(range(0, SIZE, RANGE))
    ends = [min(s + RANGE, SIZE) for s in starts]
    with tempfile.TemporaryDirectory() as tmp:
        data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
        (Path(tmp) / "obj.bin").write_bytes(data)
        print("| client | MB/s | requests/s |\n| --- | ---: | ---: |")
        with s3_server() as endpoint:
            upload_folder(endpoint, Path(tmp), "bucket", "p")
            s3 = S3Store("bucket", endpoint=endpoint, client_options={"allow_http": True}, region="us-east-1")
            lengths = [e - s for s, e in zip(starts, ends, strict=True)]
            best(
                "obstore, S3", lambda: obstore.get_ranges(s3, "p/obj.bin", starts=starts, lengths=lengths), data, starts
            )
            fs = fsspec.filesystem("s3", endpoint_url=endpoint, key="testing", secret="testing")
            best("s3fs", lambda: fs.cat_ranges(["bucket/p/obj.bin"] * len(starts), starts, ends), data, starts)
        with nginx(Path(tmp)) as url:
            http = HTTPStore.from_url(url + "/", client_options={"allow_http": True})
            best(
                "obstore, HTTP",
                lambda: obstore.get_ranges(http, "obj.bin", starts=starts, lengths=lengths),
                data,
                starts,
            )
            fh = fsspec.filesystem("http")
            best("fsspec HTTP", lambda: fh.cat_ranges([f"{url}/obj.bin"] * len(starts), starts, ends), data, starts)


if __name__ == "__main__":
    main()
