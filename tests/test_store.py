"""pipelines/store.py against real servers on 127.0.0.1: moto's S3 server and nginx, with faults injected by a proxy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from servers import CREDENTIALS, NGINX, FaultProxy, nginx, s3_client, s3_server, upload_folder

from mae_fast.pipelines.store import LocalStorage, ObjectChanged, ObjectStorage, StoreError, open_storage, redact
from mae_fast.pipelines.validate import DatasetScanError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FAST = {"allow_http": True, "backoff_s": 0.01, "max_backoff_s": 0.05}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("objects")
    rng = np.random.default_rng(0)
    (root / "big.bin").write_bytes(rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    (root / "small.txt").write_bytes(b"v1.2 3\n")
    return root


@pytest.fixture(scope="module")
def s3(folder):
    old = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    with s3_server() as endpoint:
        upload_folder(endpoint, folder, "bucket", "data/set")
        yield endpoint
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def http(folder):
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed (.ci/run installs it)")
    with nginx(folder) as url:
        yield url


def _s3(endpoint: str, prefix: str = "s3://bucket/data/set", **extra) -> ObjectStorage:
    return ObjectStorage(prefix, {**FAST, "endpoint": endpoint, **extra}, warn=lambda m: None)


RANGES = [(0, 1000), (5000, 2 << 20), ((3 << 20) - 10, 3 << 20)]


def _expected(folder: Path) -> list[bytes]:
    data = (folder / "big.bin").read_bytes()
    return [data[a:b] for a, b in RANGES]


def test_local_and_s3_read_the_same_bytes(folder, s3):
    local, remote = LocalStorage(str(folder)), _s3(s3)
    assert remote.list() == local.list() == {"big.bin": 3 << 20, "small.txt": 7}
    assert remote.read("small.txt") == local.read("small.txt") == b"v1.2 3\n"
    assert [bytes(v) for v in remote.read_ranges("big.bin", RANGES)] == _expected(folder)
    assert [bytes(v) for v in local.read_ranges("big.bin", RANGES)] == _expected(folder)


def test_http_reads_ranges_and_says_it_cannot_list(folder, http):
    store = open_storage(http + "/", {"allow_http": True})
    assert store.read("small.txt") == b"v1.2 3\n"
    assert [bytes(v) for v in store.read_ranges("big.bin", RANGES)] == _expected(folder)
    with pytest.raises(StoreError, match="cannot list a folder.*manifest.json"):
        store.list()


def test_a_range_past_the_end_is_an_error_naming_the_object(folder, s3):
    with pytest.raises(StoreError, match=r"s3://bucket/data/set/big.bin ends at byte 3145728"):
        _s3(s3).read_ranges("big.bin", [((3 << 20) - 10, (3 << 20) + 10)])
    with pytest.raises(StoreError, match=r"big.bin ends at byte 3145728"):
        LocalStorage(str(folder)).read_ranges("big.bin", [((3 << 20) - 10, (3 << 20) + 10)])


def test_missing_object_bucket_and_refused_credentials_each_say_so(s3):
    with pytest.raises(StoreError, match=r"s3://bucket/data/set/nope.idx: no such object \(404"):
        _s3(s3).read("nope.idx")
    with pytest.raises(StoreError, match=r"s3://nobucket/x/: the bucket 'nobucket' does not exist"):
        _s3(s3, "s3://nobucket/x").list()


def test_wrong_credentials_are_refused_in_one_line(folder, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with s3_server(no_auth_actions=2) as endpoint:  # the bucket and one object, then credentials are checked
        c = s3_client(endpoint)
        c.create_bucket(Bucket="bucket")
        c.put_object(Bucket="bucket", Key="p/small.txt", Body=b"x")
        store = ObjectStorage(
            "s3://bucket/p",
            {**FAST, "endpoint": endpoint, "access_key_id": "AKIAWRONG", "secret_access_key": "wrong"},
            warn=lambda m: None,
        )
        with pytest.raises(StoreError, match=r"refused the credentials \(403.*InvalidAccessKeyId") as e:
            store.read("small.txt")
        assert "wrong" not in str(e.value).replace("wrong credentials", "")


def test_503s_are_retried_with_backoff_and_reported_once(folder, s3):
    port = int(s3.rsplit(":", 1)[1])
    proxy = FaultProxy(port)
    proxy.fail(3, "503")
    said: list[str] = []
    store = ObjectStorage("s3://bucket/data/set", {**FAST, "endpoint": proxy.url}, warn=said.append)
    assert [bytes(v) for v in store.read_ranges("big.bin", RANGES[:1])] == _expected(folder)[:1]
    assert len(said) == 1 and "503" in said[0] and "retrying" in said[0]
    proxy.fail(10, "503")
    store = ObjectStorage("s3://bucket/data/set", {**FAST, "endpoint": proxy.url, "retries": 2}, warn=said.append)
    with pytest.raises(StoreError, match=r"s3://bucket/data/set/small.txt: 503.*after 2 retries"):
        store.read("small.txt")
    proxy.close()


def test_a_connection_dropped_mid_object_is_retried(folder, http):
    port = int(http.rsplit(":", 1)[1])
    proxy = FaultProxy(port)
    proxy.fail(2, "drop")
    said: list[str] = []
    store = ObjectStorage(proxy.url, FAST, warn=said.append)
    assert bytes(store.read_ranges("big.bin", [(0, 2 << 20)])[0]) == (folder / "big.bin").read_bytes()[: 2 << 20]
    assert len(said) == 1
    proxy.close()


def test_a_stalled_read_times_out_instead_of_hanging(http):
    port = int(http.rsplit(":", 1)[1])
    proxy = FaultProxy(port)
    proxy.fail(5, "stall")
    store = ObjectStorage(proxy.url, {**FAST, "timeout": "1s", "retries": 1}, warn=lambda m: None)
    with pytest.raises(StoreError, match=r"small.txt: .*after 1 retries"):
        store.read("small.txt")
    proxy.close()


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"no_such_option": 1}, r"s3://bucket/p: cannot open the store.*no_such_option"),
        ({"retries": "abc"}, r"data.storage_options.retries: must be a number in \[0, 100\], got 'abc'"),
        ({"retries": -1}, r"data.storage_options.retries: must be a number in \[0, 100\], got -1"),
        ({"backoff_s": -0.5}, r"data.storage_options.backoff_s: must be a number in \[0, 60\], got -0.5"),
        ({"max_backoff_s": True}, r"data.storage_options.max_backoff_s: must be a number"),
    ],
)
def test_a_bad_option_names_itself(options, expected):
    with pytest.raises(DatasetScanError, match=expected):  # a bad data path or option: exit 2, nothing started
        ObjectStorage("s3://bucket/p", options)


def test_credentials_in_a_url_are_never_shown(folder, http):
    url = http.replace("http://", "http://reader:s3cr3t@")  # nginx ignores them
    store = ObjectStorage(url, FAST, warn=lambda m: None)
    assert store.url == http and store.read("small.txt") == b"v1.2 3\n"
    with pytest.raises(StoreError) as e:
        store.read("nope.txt")
    assert "s3cr3t" not in str(e.value) and f"{http}/nope.txt: no such object" in str(e.value)


def test_credentials_are_redacted_for_printing():
    shown = redact({"endpoint": "http://x", "secret_access_key": "s3cr3t", "session_token": "t", "allow_http": True})
    assert shown == {"endpoint": "http://x", "secret_access_key": "***", "session_token": "***", "allow_http": True}


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_a_replaced_object_is_caught_by_its_tag(tmp_path, kind, request):
    (tmp_path / "obj.bin").write_bytes(b"a" * 4096)
    with s3_server() if kind == "s3" else nginx(tmp_path) as url:
        if kind == "s3":
            upload_folder(url, tmp_path, "bucket", "t")
            store = _s3(url, "s3://bucket/t")
        else:
            store = ObjectStorage(url, FAST, warn=lambda m: None)
        size, tag = store.head("obj.bin")
        assert size == 4096 and tag
        assert bytes(store.read_ranges("obj.bin", [(0, 4)], (size, tag))[0]) == b"aaaa"
        (tmp_path / "obj.bin").write_bytes(b"b" * 4096)  # the same size, other bytes, written later:
        os.utime(tmp_path / "obj.bin", (1e9, 1e9))  # nginx's ETag is (mtime in seconds, size)
        if kind == "s3":
            upload_folder(url, tmp_path, "bucket", "t")
        with pytest.raises(ObjectChanged, match=r"obj.bin: another version \(412"):
            store.read_ranges("obj.bin", [(0, 4)], (size, tag))


def test_a_store_pickles_as_its_url_and_options(s3, folder):
    import pickle

    store = ObjectStorage("s3://bucket/data/set", {**FAST, "endpoint": s3})  # warns on stderr: picklable
    store = pickle.loads(pickle.dumps(store))  # a ShardSet is broadcast to the ranks
    assert store.read("small.txt") == b"v1.2 3\n"


def test_a_changed_size_is_caught(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    local = LocalStorage(str(tmp_path))
    version = local.head("f.bin")
    (tmp_path / "f.bin").write_bytes(b"x" * 50)
    with pytest.raises(ObjectChanged, match=r"f.bin: 50 bytes, 100 when it was checked"):
        local.read_ranges("f.bin", [(0, 10)], version)
