"""WebDataset shards on the CPU: make-shards, the index, scan, and the ShardLoader's order, resume, bad samples."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from conftest import broken_huffman_copy
from PIL import Image
from test_pipelines_dali import AUG, SIZE, THREADS, decode_indices, epoch_batches, index_colour, same

pytest.importorskip("nvidia.dali")

from mae_fast.cli import main  # noqa: E402
from mae_fast.pipelines import make_shards as make_shards_module  # noqa: E402
from mae_fast.pipelines.common import Augmentation  # noqa: E402
from mae_fast.pipelines.dali import DaliLoader  # noqa: E402
from mae_fast.pipelines.make_shards import make_shards  # noqa: E402
from mae_fast.pipelines.scan import DatasetScanError, scan_dataset  # noqa: E402
from mae_fast.pipelines.shard_loader import ShardLoader, bench_shards_vs_folder  # noqa: E402
from mae_fast.pipelines.shards import (  # noqa: E402
    LANES,
    ShardReadError,
    epoch_plan,
    is_shard_path,
    open_shards,
    runs,
    scan_shards,
)

PER_SHARD = 5 * (512 + 1024 + 1024)  # tar bytes of 5 small index images with their .cls members


def write_index_tree(root, n: int, classes: int = 3) -> None:
    """n solid-colour JPEGs, image i (colour index_colour(i)) in root/c<i % classes>/<i>.jpg."""
    for i in range(n):
        folder = os.path.join(root, f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        Image.new("RGB", (40, 30), index_colour(i)).save(os.path.join(folder, f"{i:03d}.jpg"), quality=95)


def image_index(name: str) -> int:
    """The image index of a sample name such as 'shard-000003.tar:c1/016'."""
    return int(name.rsplit("/", 1)[-1].rsplit(":", 1)[-1][:3])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """43 index JPEGs in 3 classes, one index PNG, and two files the scan rejects; and their shards."""
    src = tmp_path_factory.mktemp("src")
    write_index_tree(src, 43)
    Image.new("RGB", (40, 30), index_colour(43)).save(src / "c0" / "043.png")
    data = (src / "c1" / "001.jpg").read_bytes()
    (src / "c1" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (src / "c2" / "notes.jpg").write_text("not a picture\n")
    dst = tmp_path_factory.mktemp("shards")
    report = make_shards(str(src), str(dst), shard_bytes=PER_SHARD, workers=2, progress=False)
    return src, dst, report


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 photographs (ImageNet-like JPEGs) as a folder and as shards of about 3 images."""
    pytest.importorskip("skimage")
    from mae_fast.pipelines.sample_data import make_sample_data

    root = make_sample_data(str(tmp_path_factory.mktemp("photos")), n=48, num_classes=2)
    dst = tmp_path_factory.mktemp("photo_shards")
    make_shards(root, str(dst), shard_bytes=200_000, workers=2, progress=False)
    return scan_dataset(root, progress=False).files, open_shards(str(dst))


def loader(shards, batch_size: int = 4, **kw) -> ShardLoader:
    return ShardLoader(shards, batch_size, AUG, input_size=SIZE, seed=kw.pop("seed", 7), num_threads=THREADS, **kw)


# ---------------------------------------------------------------- make-shards


def test_make_shards_round_trip(tree):
    src, dst, report = tree
    assert (report.samples, report.written) == (44, report.shards) and report.shards == 9
    assert sorted(os.path.basename(p) for p, _ in report.bad) == ["notes.jpg", "truncated.jpg"]
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["complete"] and manifest["classes"] == ["c0", "c1", "c2"]
    assert sorted(rel for rel, _ in manifest["bad"]) == ["c1/truncated.jpg", "c2/notes.jpg"]
    assert [s["samples"] for s in manifest["shards"]] == [5] * 8 + [4]

    seen = {}
    for entry in manifest["shards"]:
        with tarfile.open(dst / entry["name"]) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "cls":
                continue
            assert key not in seen  # every image in exactly one shard
            seen[key] = data
            assert data == (src / f"{key}.{ext}").read_bytes()  # the source bytes, not recompressed
            assert members[f"{key}.cls"] == str(int(key[1])).encode()  # class index of c<k>
    good = {os.path.splitext(os.path.relpath(p, src))[0] for p in scan_dataset(str(src), progress=False).files}
    assert set(seen) == good and len(good) == 44

    # the index is wds2idx's, byte for byte
    if shutil.which("tar"):
        out = dst.parent / "wds2idx.idx"
        subprocess.run(["wds2idx", str(dst / "shard-000000.tar"), str(out)], check=True, capture_output=True)
        assert out.read_text() == (dst / "shard-000000.idx").read_text()
    # scan: counted from the indexes; nothing wrong
    found = scan_shards(str(dst))
    assert (found.samples, found.problems, len(found.bad)) == (44, [], 2)
    assert scan_shards(str(dst / "manifest.json")).samples == 44  # the manifest names the folder too
    assert is_shard_path(str(dst)) and is_shard_path(str(dst / "manifest.json")) and not is_shard_path(str(src))


def test_interrupted_make_shards_is_completed_by_a_rerun(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_index_tree(src, 12)
    clean = tmp_path / "clean"
    make_shards(str(src), str(clean), shard_bytes=PER_SHARD // 2, workers=2, progress=False)

    write = make_shards_module._write_shard

    def interrupted(src_, dst_, name, samples, advance, storage):
        if name == "shard-000002.tar":
            (tmp_path / "dst" / f".{name}.tmp").write_bytes(b"half a tar")
            raise KeyboardInterrupt
        return write(src_, dst_, name, samples, advance, storage)

    monkeypatch.setattr(make_shards_module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_shards(str(src), str(tmp_path / "dst"), shard_bytes=PER_SHARD // 2, workers=1, progress=False)
    with pytest.raises(DatasetScanError, match="did not finish"):
        open_shards(str(tmp_path / "dst"))
    monkeypatch.setattr(make_shards_module, "_write_shard", write)
    report = make_shards(str(src), str(tmp_path / "dst"), shard_bytes=PER_SHARD // 2, workers=2, progress=False)
    assert 0 < report.written < report.shards == 6
    assert sorted(os.listdir(tmp_path / "dst")) == sorted(os.listdir(clean))  # no temporary file left
    for name in os.listdir(clean):
        if name != "manifest.json":
            assert (tmp_path / "dst" / name).read_bytes() == (clean / name).read_bytes(), name

    # a changed source is not mixed into the shards of the old one
    write_index_tree(src, 13)
    with pytest.raises(DatasetScanError, match="another source or settings"):
        make_shards(str(src), str(tmp_path / "dst"), shard_bytes=PER_SHARD // 2, progress=False)


def test_cli_make_shards_and_scan_name_a_truncated_and_a_missing_shard(tree, tmp_path, capsys):
    src, _, _ = tree
    dst = tmp_path / "dst"
    assert main(["make-shards", str(src), str(dst), "--shard-size-mb", str(PER_SHARD / 2**20), "--workers", "2"]) == 0
    assert "44 samples in 9 shards" in capsys.readouterr().out
    assert main(["scan", str(dst)]) == 0
    assert "44 samples in 3 classes in 9 shards" in capsys.readouterr().out

    opened = open_shards(str(dst))  # opened while whole: a read after the damage names the shard
    data = (dst / "shard-000003.tar").read_bytes()
    (dst / "shard-000003.tar").write_bytes(data[: len(data) // 3])
    (dst / "shard-000007.tar").unlink()
    assert main(["scan", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "shard-000003.tar (truncated" in err and "shard-000007.tar (missing)" in err
    with pytest.raises(DatasetScanError, match=r"shard-000003.tar \(truncated.*shard-000007.tar \(missing"):
        loader(str(dst))  # what the train loop meets before it builds a model
    with pytest.raises(
        ShardReadError, match="shard-000003.tar changed during the run: .* bytes, .* when the run started"
    ):
        opened.read_run(3, int(opened.starts[3]), int(opened.starts[4]))
    # a rerun repairs it
    assert main(["make-shards", str(src), str(dst), "--shard-size-mb", str(PER_SHARD / 2**20)]) == 0
    assert "7 of them already complete" in capsys.readouterr().out


# ---------------------------------------------------------------- the order


def test_epoch_plan_reads_whole_shards_and_partitions_the_data():
    counts = np.array([1000] * 37 + [321])  # 37,321 samples
    B, world, block = 32, 4, 2048
    starts = np.concatenate([[0], np.cumsum(counts)])
    plans = [
        epoch_plan(counts, B, seed=3, epoch=0, shard_id=k, num_shards=world, block_size=block) for k in range(world)
    ]
    L = 37321 // world // B
    for p in plans:
        assert p.order.shape == (L, B) and len(np.unique(p.order)) == L * B
        # each block holds what the batches of its part of the epoch take
        for j, samples in enumerate(p.blocks):
            assert set(p.order[j * p.batches_per_block : (j + 1) * p.batches_per_block].ravel()) == set(samples)
        pieces = [r for b in p.blocks for r in runs(b, starts)]
        assert len(pieces) <= LANES * len(p.blocks) + 11  # a run of 32 samples a lane a block, cut at shard edges
        spanned = {shard for shard, _, _ in runs(np.sort(np.concatenate(p.blocks)), starts)}
        # every block draws from every shard of the rank's run (but the partial ones at its two ends)
        assert all(len({shard for shard, _, _ in runs(b, starts)}) >= len(spanned) - 2 for b in p.blocks)
        assert sum(stop - first for _, first, stop in pieces) == L * B
    every = np.concatenate([p.order.ravel() for p in plans])
    assert len(np.unique(every)) == len(every) == 37321 - 37321 % (world * B)  # disjoint, complete but a few
    again = epoch_plan(counts, B, seed=3, epoch=0, shard_id=1, num_shards=world, block_size=block)
    nxt = epoch_plan(counts, B, seed=3, epoch=1, shard_id=1, num_shards=world, block_size=block)
    assert np.array_equal(again.order, plans[1].order) and not np.array_equal(nxt.order, plans[1].order)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        epoch_plan(counts, B, seed=3, epoch=0, shard_id=0, num_shards=1, block_size=40)


def test_every_sample_once_ranks_disjoint_and_complete_new_order_each_epoch(tree):
    _, dst, _ = tree
    shard_set = open_shards(str(dst))
    planned = lambda ld, e: [image_index(shard_set.names[s]) for s in ld.epoch_order(e).ravel()]  # noqa: E731
    ranks = [loader(shard_set, shard_id=k, num_shards=2, shuffle_buffer=8) for k in range(2)]
    assert [len(r) for r in ranks] == [5, 5]  # 44 samples, batch 4, 2 ranks: 4 left out
    epochs = []
    for e in range(2):
        seen = []
        for rank in ranks:
            rank.set_epoch(e)
            got = [i for b in epoch_batches(rank) for i in decode_indices(b)]
            assert got == planned(rank, e)  # the pipeline follows the planned order exactly
            assert len(set(got)) == len(got) == 20
            seen.append(got)
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 40
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    # reads: one open and one read per run of a shard (a block may cut one), never one per sample
    reads = ranks[0].read_stats.as_dict()
    blocks = [b for e in range(3) for b in ranks[0]._plan(epoch=e).blocks]  # epoch 2: read ahead
    assert reads["reads"] == reads["opens"] <= sum(len(runs(b, shard_set.starts)) for b in blocks)
    assert reads["bytes_per_read"] > 2 * shard_set.sizes.mean()

    # the same seed repeats bit for bit; another seed gives another order
    first = epoch_batches(loader(shard_set, shard_id=1, num_shards=2, shuffle_buffer=8))
    again = epoch_batches(loader(shard_set, shard_id=1, num_shards=2, shuffle_buffer=8))
    assert same(first, again)
    other = loader(shard_set, shard_id=1, num_shards=2, shuffle_buffer=8, seed=8)
    assert [i for b in epoch_batches(other) for i in decode_indices(b)] == planned(other, 0) != epochs[0][1]


def test_dali_webdataset_reader_reads_the_shards(tree):
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    _, dst, _ = tree
    shard_set = open_shards(str(dst))
    tars = [str(dst / t) for t in shard_set.tars]
    pipe = Pipeline(batch_size=4, num_threads=THREADS, device_id=None)
    with pipe:
        images, labels = fn.readers.webdataset(
            paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg;png", "cls"], name="wds"
        )
        pipe.set_outputs(fn.decoders.image(images, device="cpu"), labels)
    pipe.build()
    assert pipe.epoch_size("wds") == 44
    _, labels = pipe.run()
    assert [int(bytes(np.array(t)).decode()) for t in labels] == [int(n.split(":c")[1][0]) for n in shard_set.names[:4]]


# ---------------------------------------------------------------- resume, bad samples, statistics


def test_resume_gives_identical_batches_across_block_and_epoch_boundaries(photos):
    _, shard_set = photos

    def make(seed: int = 2) -> ShardLoader:
        return loader(shard_set, 8, seed=seed, shuffle_buffer=16)  # 6 batches an epoch, blocks of 2

    ref = make()
    ref_batches = epoch_batches(ref) + epoch_batches(ref)  # epochs 0 and 1, uninterrupted
    assert len(ref_batches) == 12
    for stop in (3, 2, 6, 7):  # mid-block, at a block edge, at the epoch's end, in the next epoch
        run = make()
        it, head = iter(run), []
        for _ in range(stop):
            try:
                head.append(next(it).clone())
            except StopIteration:
                it = iter(run)
                head.append(next(it).clone())
        state = json.loads(json.dumps(run.state()))  # as in a checkpoint file
        del run, it
        resumed = make()
        resumed.load_state(state)
        resumed.set_epoch(stop // 6)  # what a train loop does first: keeps the position
        tail = epoch_batches(resumed)
        if resumed.epoch == 0:
            tail += epoch_batches(resumed)
        assert same(head + tail, ref_batches), stop
    with pytest.raises(ValueError, match="shuffle_buffer"):
        loader(shard_set, 8, seed=2, shuffle_buffer=24).load_state(state)
    with pytest.raises(ValueError, match="state is for a 'shards' loader"):
        DaliLoader(["x.jpg"] * 48, 8, AUG, input_size=SIZE, seed=2).load_state(state)


def test_undecodable_sample_in_a_shard_is_left_out_reported_and_stays_out(tmp_path):
    src = tmp_path / "src"
    write_index_tree(src, 11, classes=1)
    broken_huffman_copy(src / "c0" / "005.jpg", src / "c0" / "005b.jpg")  # passes the scan
    report = make_shards(str(src), str(tmp_path / "dst"), shard_bytes=PER_SHARD, workers=2, progress=False)
    assert report.samples == 12 and not report.bad
    shard_set = open_shards(str(tmp_path / "dst"))
    bad = next(i for i, n in enumerate(shard_set.names) if n.endswith(":c0/005b"))
    run = loader(shard_set, 4, shuffle_buffer=4)

    counts = np.zeros(11, int)
    for batch in epoch_batches(run):  # 3 batches: every sample once, 005b included
        for i in decode_indices(batch):
            counts[i] += 1
    sub = (bad + 1) % 12
    expected = np.ones(11, int)
    expected[image_index(shard_set.names[sub])] += 1  # read in the place of 005b
    assert counts.tolist() == expected.tolist()
    ((name, reason),) = run.take_bad_files()
    assert name == shard_set.names[bad] and name.startswith("shard-") and ".tar:c0/005b" in name and reason
    assert run.substitutes == {bad: sub}

    state = json.loads(json.dumps(run.state()))
    resumed = loader(shard_set, 4, shuffle_buffer=4)
    resumed.load_state(state)
    resumed.set_epoch(1)
    assert len(epoch_batches(resumed)) == 3 and resumed.take_bad_files() == []
    other_rank = loader(shard_set, 4, shuffle_buffer=4)  # another rank's report, by name
    other_rank.leave_out_paths([(name, reason)])
    assert other_rank.substitutes == {bad: sub} and other_rank.take_bad_files() == []


def test_statistics_match_pil_and_the_folder_loader(photos):
    """The whole image (crop area 1, no flip) of every photo, through shards, the folder loader and PIL: the
    same images once each, so the sorted per-image means agree (exactly for the two DALI paths)."""
    pytest.importorskip("torchvision")
    from mae_fast.pipelines.pil import PilLoader

    files, shard_set = photos
    whole = Augmentation(crop_scale=[1.0, 1.0], crop_ratio=[0.5, 2.0], hflip_prob=0.0)
    kw = {"input_size": SIZE, "seed": 0}
    shards = ShardLoader(shard_set, 16, whole, num_threads=THREADS, **kw)
    x = torch.cat(epoch_batches(shards)).float()
    assert x.shape == (48, 3, SIZE, SIZE) and torch.isfinite(x).all()
    folder = torch.cat(epoch_batches(DaliLoader(files, 16, whole, num_threads=THREADS, **kw))).float()
    pil = torch.cat(list(PilLoader(files, 16, whole, num_workers=0, **kw)))

    def per_image(t):
        return t.mean((1, 2, 3)).sort().values

    assert torch.allclose(per_image(x), per_image(folder), atol=2e-3)
    assert torch.allclose(per_image(x), per_image(pil), atol=0.05)  # PIL's resize differs slightly
    for stat in (lambda t: t.mean((0, 2, 3)), lambda t: t.std((0, 2, 3))):
        assert torch.allclose(stat(x), stat(pil), atol=0.05), (stat(x), stat(pil))


def test_bench_shards_vs_folder_reports_rates(photos):
    files, shard_set = photos
    rows = bench_shards_vs_folder(files, shard_set, 8, AUG, input_size=SIZE, batches=2, warmup=1, num_threads=THREADS)
    assert [r["loader"] for r in rows] == ["folder", "shards"]
    assert all(r["img_s"] > 0 and r["MB_s"] > 0 for r in rows) and rows[1]["reads"]["opens"] >= 1


# ---------------------------------------------------------------- GPU ("mixed" decoding of the shard bytes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_mixed_decoding_of_shards_keeps_order_and_statistics(tree, photos):
    _, dst, _ = tree
    shard_set = open_shards(str(dst))
    gpu = ShardLoader(shard_set, 4, AUG, input_size=SIZE, seed=7, device_id=0, shard_id=1, num_shards=2)
    assert gpu.gpu_decode
    got = [i for b in epoch_batches(gpu) for i in decode_indices(b.cpu())]
    assert got == [image_index(shard_set.names[s]) for s in gpu.epoch_order(0).ravel()]
    _, photo_set = photos
    x = torch.cat(epoch_batches(ShardLoader(photo_set, 16, AUG, input_size=SIZE, seed=0, device_id=0)))
    y = torch.cat(epoch_batches(loader(photo_set, 16, seed=0)))
    assert x.is_cuda and x.dtype == torch.float16
    x, y = x.float().cpu(), y.float()
    assert torch.allclose(x.mean((0, 2, 3)), y.mean((0, 2, 3)), atol=0.08)
    assert torch.allclose(x.std((0, 2, 3)), y.std((0, 2, 3)), atol=0.08)


def test_make_shards_rebuilds_a_bad_index_and_never_writes_through_a_planted_link(tree, tmp_path):
    src, _, _ = tree
    dst = tmp_path / "dst"
    first = make_shards(str(src), str(dst), shard_bytes=PER_SHARD, progress=False)
    whole = {p.name: p.read_bytes() for p in dst.iterdir()}
    idx = dst / "shard-000002.idx"
    idx.write_text(idx.read_text().replace(" 512 ", " -512 ", 1))  # a negative first offset
    (dst / "shard-000005.tar").unlink()
    precious = tmp_path / "precious"
    precious.write_text("untouched")
    for name in (".shard-000005.tar.tmp", "shard-000005.idx.tmp", "manifest.json.tmp"):
        (dst / name).symlink_to(precious)  # where make-shards writes before it renames
    again = make_shards(str(src), str(dst), shard_bytes=PER_SHARD, progress=False)
    assert again.written == 2 and again.shards == first.shards  # the bad index's shard and the missing one
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == whole  # exactly a clean run's bytes, no link left
    assert precious.read_text() == "untouched"


def test_on_class_sorted_shards_batches_mix_more_shards_than_webdatasets_buffer(tmp_path):
    """benchmarks/mixing.py's comparison, at a buffer of 64 and the memory mae-fast holds (two blocks)."""
    import webdataset as wds

    n, per_shard, batch, buffer = 2560, 128, 32, 64
    with wds.ShardWriter(str(tmp_path / "part-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            sink.write({"__key__": f"{i:06d}", "cls": i // 320})  # class-sorted: 8 classes of 320
    urls = sorted(str(p) for p in tmp_path.glob("part-*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False).shuffle(2 * buffer, seed=0)
    theirs = np.array([int(s["__key__"]) for s in ds])[: n // batch * batch].reshape(-1, batch)
    ours = epoch_plan(
        np.full(len(urls), per_shard), batch, seed=0, epoch=0, shard_id=0, num_shards=1, block_size=buffer
    ).order
    for got in (theirs, ours):  # both are one epoch of every sample once
        assert sorted(got.ravel()) == list(range(n))

    def shards_per_batch(order: np.ndarray) -> float:
        return float(np.mean([len(set(b // per_shard)) for b in order]))

    assert shards_per_batch(ours) >= 1.5 * shards_per_batch(theirs)  # measured: 8.0 against 4.44


def test_a_manifest_that_is_a_fifo_or_a_device_link_is_refused_without_reading_it(tmp_path, capsys):
    from mae_fast.cli import main

    for name, plant in (("fifo", lambda p: os.mkfifo(p)), ("zero", lambda p: p.symlink_to("/dev/zero"))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "shard-000000.tar").write_bytes(b"\0" * 1024)
        plant(folder / "manifest.json")  # would block open(), or never end a read
        assert main(["scan", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"{folder}/manifest.json: (file): unreadable (not a regular file)" in err and "Traceback" not in err
