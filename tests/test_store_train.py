"""Training from an object store, end to end on the CPU against real servers on 127.0.0.1 (moto's S3 server,
nginx): the same per-step losses as the local copy of the same shards, exact resume after SIGKILL from S3, retried
faults that change nothing, and the errors that stop a run before it starts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from helpers import ROOT
from servers import CREDENTIALS, NGINX, FaultProxy, nginx, s3_client, s3_server, upload_folder
from test_shards_train import SHARD_BYTES, assert_sigkill_resume_is_exact, tiny

from mae_fast.cli import main
from mae_fast.pipelines.dali import dali_available
from mae_fast.pipelines.make_shards import make_shards

pytestmark = [
    pytest.mark.skipif(not dali_available(), reason="needs nvidia.dali"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
DEMO = str(ROOT / "configs/demo.yaml")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """48 sample photographs."""
    from mae_fast.pipelines.sample_data import make_sample_data

    return Path(make_sample_data(str(tmp_path_factory.mktemp("data") / "sample"), n=48))


@pytest.fixture(scope="module")
def shards(sample) -> Path:
    """The sample as shards (40 of them), with their manifest and indexes."""
    make_shards(str(sample), str(sample.parent / "shards"), shard_bytes=SHARD_BYTES, workers=2, progress=False)
    return sample.parent / "shards"


@pytest.fixture(scope="module")
def s3(shards):
    """moto's S3 server holding the shards at s3://bucket/shards; AWS_* point every client at it."""
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    with s3_server() as endpoint:
        os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
        upload_folder(endpoint, shards, "bucket", "shards")
        yield endpoint
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def losses(out: Path) -> list[float]:
    from test_run import losses_by_step

    by_step = losses_by_step(out)
    return [by_step[k] for k in sorted(by_step)]


def train(tmp: Path, data: str, *extra: str) -> tuple[int, list[float]]:
    code = main(["train", DEMO, *tiny(tmp, data, "data.shuffle_buffer=16", *extra)])
    return code, losses(tmp / "out") if code == 0 else []


def test_s3_and_http_runs_give_the_local_copys_losses(tmp_path, shards, s3, capsys):
    """`mae-fast train configs/demo.yaml --set data.data_path=s3://bucket/shards` (AWS_ENDPOINT_URL: the server)."""
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed (.ci/run installs it)")
    local = train(tmp_path / "local", str(shards))
    remote = train(tmp_path / "s3", "s3://bucket/shards")
    with nginx(shards) as url:
        http = train(tmp_path / "http", f"{url}/")
    out = capsys.readouterr().out
    assert local[0] == remote[0] == http[0] == 0
    assert len(local[1]) == 6 and remote[1] == local[1] and http[1] == local[1]
    assert re.search(r"data: 48 samples in \d+ shards in s3://bucket/shards", out)
    assert "testing" not in out  # the credentials are never printed


@pytest.mark.slow
def test_sigkill_then_auto_resume_from_s3_gives_the_uninterrupted_losses(tmp_path, s3):
    def args(run: Path, out: str, *extra: str) -> list[str]:
        sets = tiny(run, "s3://bucket/shards", "data.shuffle_buffer=16", "schedule.epochs=4", *extra)
        return [*sets, "--set", f"logging.output_dir={run}/{out}"]

    assert_sigkill_resume_is_exact(args, tmp_path, total=12, kill_at=4)


def test_503s_during_a_run_are_retried_and_change_no_loss(tmp_path, shards, s3, capsys):
    local = train(tmp_path / "local", str(shards))
    proxy = FaultProxy(int(s3.rsplit(":", 1)[1]))
    proxy.fail(3, "503")
    faults = f"data.storage_options={{endpoint: '{proxy.url}', backoff_s: 0.01}}"
    remote = train(tmp_path / "s3", "s3://bucket/shards", faults)
    captured = capsys.readouterr()
    assert remote[0] == 0 and remote[1] == local[1]
    assert (captured.out + captured.err).count("retrying with backoff (reported once)") == 1
    proxy.close()


@pytest.mark.parametrize(
    "path, options, expected",
    [
        ("s3://nobucket/shards", "", r"s3://nobucket/.*the bucket 'nobucket' does not exist"),
        ("s3://bucket/none", "", r"no shards \(\*\.tar\) and no manifest.json in s3://bucket/none"),
        (
            "s3://bucket/shards",
            "data.storage_options={retries: 1, backoff_s: 0.01, endpoint: 'http://127.0.0.1:9'}",
            r"s3://bucket/shards/manifest.json: .*after 1 retries",
        ),
    ],
)
def test_a_store_that_cannot_be_read_stops_before_training_with_one_line(tmp_path, s3, capsys, path, options, expected):
    extra = (options,) if options else ()
    assert main(["train", DEMO, *tiny(tmp_path, path, *extra)]) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err), err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("ckpt/**/*.pt"))  # nothing was started (the lock file is all a refusal leaves)


def test_refused_credentials_stop_before_training_with_one_line(tmp_path, shards, monkeypatch, capsys):
    with s3_server(no_auth_actions=1) as endpoint:  # the bucket, then the credentials are checked
        s3_client(endpoint).create_bucket(Bucket="bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        assert main(["train", DEMO, *tiny(tmp_path, "s3://bucket/shards")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: .*s3://bucket/shards/manifest.json: the store refused the credentials \(403", err), err
    assert "not-the-secret" not in err


def test_make_shards_to_s3_interrupted_then_completed_by_a_rerun(tmp_path, sample, shards, s3, monkeypatch, capsys):
    """`mae-fast make-shards SRC s3://bucket/made`: uploads that fail part-way (the store stops answering after
    five objects) leave no manifest; a rerun keeps what was uploaded whole and ends with the local copy's bytes."""
    from mae_fast.pipelines.store import ObjectStorage, StoreError

    put, calls = ObjectStorage.put, []

    def failing_put(self, name, data):
        calls.append(name)
        if len(calls) > 5:
            raise StoreError(f"{self.where(name)}: 503 Service Unavailable (still failing after 5 retries)")
        put(self, name, data)

    cache = tmp_path / "cache"  # the scan's cache, and where the shards are written before their upload
    make = ["make-shards", str(sample), "s3://bucket/made", "--shard-size-mb", str(SHARD_BYTES / 2**20)]
    make += ["--workers", "1", "--cache-dir", str(cache)]
    monkeypatch.setattr(ObjectStorage, "put", failing_put)
    assert main(make) == 1
    assert "s3://bucket/made/" in capsys.readouterr().err
    client = s3_client(s3)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="bucket", Prefix="made/").get("Contents", [])}
    assert "made/manifest.json" not in keys and 0 < len(keys) <= 5
    assert not list(cache.glob("mae-fast-shards-*"))  # the local copies are gone with the failed run
    monkeypatch.setattr(ObjectStorage, "put", put)
    assert main(make) == 0
    assert "of them already complete" in capsys.readouterr().out
    for f in shards.iterdir():
        body = client.get_object(Bucket="bucket", Key=f"made/{f.name}")["Body"].read()
        assert body == f.read_bytes(), f.name  # the same shards, indexes and manifest as make-shards to a folder
    assert main(["scan", "s3://bucket/made"]) == 0
    assert "48 samples in 4 classes in 40 shards under s3://bucket/made" in capsys.readouterr().out


def test_bench_loader_times_the_store_against_the_local_copy(tmp_path, shards, s3):
    out = tmp_path / "loader.json"
    cfg = str(ROOT / "configs/bench_cpu.yaml")
    sets = ["--set", f"data.data_path={shards}", "--set", "data.shuffle_buffer=32"]
    args = ["bench-loader", cfg, *sets, "--store", "s3://bucket/shards", "--backend", "dali", "--batches", "3"]
    assert main([*args, "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    local, store = result["results"]["shards"], result["results"]["store"]
    assert local["format"] == store["format"] == "shards" and store["reads"]["reads"] > 0
    assert store["requests_per_s"] > 0 and result["ratio_store_over_local"] == store["img_s"] / local["img_s"]


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_an_object_lost_during_a_run_stops_it_with_a_checkpoint_and_it_resumes(tmp_path, shards, s3, how):
    """A shard deleted from the bucket, or overwritten by another (its ETag changes), under a running job."""
    from mae_fast.config import load_config
    from mae_fast.pipelines.scan import DatasetScanError
    from mae_fast.train import train

    client = s3_client(s3)
    upload_folder(s3, shards, "bucket", f"lost-{how}")
    victim = f"lost-{how}/shard-000003.tar"
    sets = tiny(tmp_path, f"s3://bucket/lost-{how}", "data.shuffle_buffer=8", "schedule.epochs=4")[1::2]
    seen = []

    def lose(snapshot, losses):  # at the first log point; every shard is read again in each later epoch
        seen.append(snapshot)
        if len(seen) == 1:
            if how == "deleted":
                client.delete_object(Bucket="bucket", Key=victim)
            else:
                other = (shards / "shard-000004.tar").read_bytes()
                client.put_object(Bucket="bucket", Key=victim, Body=other)

    with pytest.raises(DatasetScanError) as e:
        train(load_config(DEMO, sets), log=lambda m: None, on_log=lose)
    message = str(e.value)
    why = {"deleted": "no such object (404", "replaced": "changed during the run"}[how]
    assert f"s3://bucket/{victim}" in message and why in message, message
    saved = Path(re.search(r"continue with --set misc.resume=(\S+)", message).group(1))
    assert saved.exists()
    client.upload_file(str(shards / "shard-000003.tar"), "bucket", victim)  # the shard is back
    result = train(load_config(DEMO, [*sets, f"misc.resume={saved}"]), log=lambda m: None)
    assert result.steps_done == result.derived.total_steps
