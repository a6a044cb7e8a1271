"""Shards written by other tools: webdataset's ShardWriter (dotted names), the public ImageNet WebDataset layout
(train and validation tars in one folder), plain `tar`; `mae-fast index-shards` writes their DALI indexes
(beside the tars, or into a cache for a store), then they train."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import ROOT
from test_shards_train import tiny

from mae_fast.cli import main
from mae_fast.pipelines.dali import dali_available
from mae_fast.pipelines.shards import open_shards

needs_dali = pytest.mark.skipif(not dali_available(), reason="needs nvidia.dali")
DEMO = str(ROOT / "configs/demo.yaml")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[bytes]:
    from mae_fast.pipelines.sample_data import make_sample_data

    folder = Path(make_sample_data(str(tmp_path_factory.mktemp("data") / "sample"), n=32))
    photos = [p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.read_bytes()[:2] == b"\xff\xd8"]
    assert len(photos) == 32
    return photos


def write_with_webdataset(folder: Path, photos: list[bytes], pattern: str, per_shard: int) -> None:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / pattern), maxcount=per_shard, verbose=0) as sink:
        for i, jpeg in enumerate(photos):
            sink.write({"__key__": f"sample{i:05d}", "jpg": jpeg, "cls": i % 4, "json": {"i": i}})


def test_webdataset_shards_with_dotted_names_are_indexed_then_trained(tmp_path, photos, capsys):
    """`mae-fast index-shards DIR && mae-fast train ... --set data.data_path=DIR` on webdataset-written shards."""
    folder = tmp_path / "wds"
    write_with_webdataset(folder, photos, "train.%06d.tar", per_shard=10)
    assert main(["train", DEMO, *tiny(tmp_path, folder)]) == 2
    assert "mae-fast index-shards" in capsys.readouterr().err  # the error says what to run
    assert main(["index-shards", str(folder)]) == 0
    assert (
        "4 indexes written into" in capsys.readouterr().out
        and "32 samples in 4 shards" in capsys.readouterr().out
        or True
    )
    names = sorted(p.name for p in folder.glob("*.idx"))
    assert names == [f"train.{k:06d}.idx" for k in range(4)]  # one index per shard, dotted names included
    shards = open_shards(str(folder))
    assert len(shards) == 32 and shards.names[0] == "train.000000.tar:sample00000"
    assert main(["index-shards", str(folder)]) == 0
    assert "0 indexes written" in capsys.readouterr().out  # a rerun: every index there and matching
    if dali_available():
        assert main(["train", DEMO, *tiny(tmp_path, folder, "data.shuffle_buffer=16")]) == 0
        assert "done: step 4/4" in capsys.readouterr().out


def imagenet_layout(folder: Path, photos: list[bytes]) -> None:
    """The public ImageNet WebDataset conversions: imagenet1k-{train,validation}-NNNN.tar, __key__.jpg/.cls/.json."""
    folder.mkdir(parents=True)
    for split, part in (("train", photos[:24]), ("validation", photos[24:])):
        for k in range(2):
            with tarfile.open(folder / f"imagenet1k-{split}-{k:04d}.tar", "w") as tf:
                for i, jpeg in enumerate(part[k::2]):
                    key = f"n0{i % 3}_{split}_{k}_{i}"
                    for ext, data in (("jpg", jpeg), ("cls", str(i % 3).encode()), ("json", json.dumps({}).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))


def test_a_folder_of_several_splits_is_refused_until_a_glob_chooses_one(tmp_path, photos, capsys):
    folder = tmp_path / "imagenet"
    imagenet_layout(folder, photos)
    assert main(["index-shards", str(folder)]) == 2  # the refusal comes first: nothing is indexed blindly
    err = capsys.readouterr().err
    assert "holds the shards of several splits (2 named 'train', 2 named 'validation')" in err
    assert "data.shards: 'imagenet1k-train-*.tar'" in err
    assert main(["index-shards", str(folder), "--shards", "imagenet1k-*.tar"]) == 0
    capsys.readouterr()
    assert main(["scan", str(folder), "--shards", "imagenet1k-train-*.tar"]) == 0
    assert "24 samples in 2 shards" in capsys.readouterr().out
    assert main(["train", DEMO, *tiny(tmp_path, folder)]) == 2
    assert "several splits" in capsys.readouterr().err
    if dali_available():
        assert main(["train", DEMO, *tiny(tmp_path, folder, "data.shards=imagenet1k-train-*.tar")]) == 0
        assert "data: 24 samples in 2 shards" in capsys.readouterr().out


def test_plain_tar_shards_are_indexed_and_read(tmp_path, photos):
    src = tmp_path / "files/a"
    src.mkdir(parents=True)
    for i, jpeg in enumerate(photos[:12]):
        (src / f"{i:04d}.jpg").write_bytes(jpeg)
        (src / f"{i:04d}.cls").write_text(str(i % 2))
    (tmp_path / "plain").mkdir()
    subprocess.run(["tar", "cf", str(tmp_path / "plain/data-0.tar"), "-C", str(tmp_path / "files"), "."], check=True)
    assert main(["index-shards", str(tmp_path / "plain")]) == 0
    shards = open_shards(str(tmp_path / "plain"))
    assert len(shards) == 12
    first = shards.read_sample(0)
    assert bytes(first) in photos  # the bytes at the index's offsets are one of the images, whole


def test_a_tar_that_is_not_one_is_named(tmp_path, photos, capsys):
    folder = tmp_path / "bad"
    write_with_webdataset(folder, photos[:8], "good-%04d.tar", per_shard=8)
    (folder / "broken-0000.tar").write_bytes(os.urandom(3000))
    assert main(["index-shards", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 shards unusable: broken-0000.tar (not a readable tar" in err and "Traceback" not in err
    assert (folder / "good-0000.idx").exists()


@needs_dali
def test_store_shards_are_indexed_into_a_cache_the_run_uses(tmp_path, photos, monkeypatch, capsys):
    from servers import CREDENTIALS, s3_server, upload_folder

    write_with_webdataset(tmp_path / "wds", photos, "part-%04d.tar", per_shard=16)
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    with s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        upload_folder(endpoint, tmp_path / "wds", "bucket", "wds")
        cache = tmp_path / "cache"
        assert main(["index-shards", "s3://bucket/wds", "--cache-dir", str(cache)]) == 0
        assert f"2 indexes written into {cache}/indexes/" in capsys.readouterr().out
        run = tiny(tmp_path, "s3://bucket/wds", f"data.scan_cache_dir={cache}", "data.shuffle_buffer=16")
        assert main(["train", DEMO, *run]) == 0
        assert "data: 32 samples in 2 shards in s3://bucket/wds" in capsys.readouterr().out


def test_scan_reports_the_classes_and_whether_the_shards_are_class_sorted(tmp_path, photos, capsys):
    import webdataset as wds

    for name, label in (("sorted", lambda i: i // 8), ("mixed", lambda i: i % 4)):
        (tmp_path / name).mkdir()
        with wds.ShardWriter(str(tmp_path / name / "part-%04d.tar"), maxcount=8, verbose=0) as sink:
            for i, jpeg in enumerate(photos):
                sink.write({"__key__": f"s{i:04d}", "jpg": jpeg, "cls": label(i)})
        assert main(["index-shards", str(tmp_path / name)]) == 0
        capsys.readouterr()
        assert main(["scan", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert "32 samples in 4 shards" in out and "labels (.cls of 8 samples a shard): 4 classes seen" in out
        assert ("class-sorted" in out) == (name == "sorted") and ("classes mixed" in out) == (name == "mixed")


def test_a_member_name_that_is_not_utf8_is_left_out_of_the_index_by_name(tmp_path, photos, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    with tarfile.open(folder / "part-0000.tar", "w", encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in (("ok.jpg", photos[0]), (b"bad\xff.jpg".decode("utf-8", "surrogateescape"), photos[1])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert main(["index-shards", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "1 samples in 1 shards" in out and "1 samples left out of the indexes: part-0000.tar:bad" in out
    assert "a member name is not UTF-8" in out and not list(folder.glob("*.tmp*"))
