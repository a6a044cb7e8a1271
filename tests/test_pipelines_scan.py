"""Dataset scan: layouts, per-file checks, errors that name the path, the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mae_fast.pipelines import scan
from mae_fast.pipelines.scan import DatasetScanError, check_image, format_bad, scan_dataset


def jpeg(path, size=(32, 24), colour=(200, 30, 90), **kw) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG", **kw)
    return str(path)


def noisy_rgb(h=48, w=64) -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8))


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(DatasetScanError, match="does not exist") as e:
        scan_dataset(str(missing), progress=False)
    assert str(missing) in str(e.value)


def test_file_instead_of_folder_and_empty_folders(tmp_path):
    f = jpeg(tmp_path / "one.jpg")
    with pytest.raises(DatasetScanError, match="not a directory") as e:
        scan_dataset(f, progress=False)
    assert f in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetScanError, match="no image files") as e:
        scan_dataset(str(empty), progress=False)
    assert str(empty) in str(e.value)

    (empty / "README.txt").write_text("not an image")
    (empty / "class_a").mkdir()
    with pytest.raises(DatasetScanError, match="no image files"):
        scan_dataset(str(empty), progress=False)

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "a.jpg").write_text("text")
    with pytest.raises(DatasetScanError, match="none of the 1 image files") as e:
        scan_dataset(str(only_bad), progress=False)
    assert "a.jpg (not an image (text))" in str(e.value)


def test_imagenet_layout(tmp_path):
    for cls, names in {"n02": ["b.JPEG", "a.jpeg"], "n01": ["z.jpg", "sub/y.PNG"]}.items():
        for name in names:
            p = tmp_path / cls / name
            if name.endswith("PNG"):
                p.parent.mkdir(parents=True, exist_ok=True)
                noisy_rgb().save(p)
            else:
                jpeg(p)
    jpeg(tmp_path / "loose_top_level.jpg")  # ignored in the class layout, as ImageFolder does
    jpeg(tmp_path / ".hidden" / "x.jpg")  # hidden folder: not a class
    (tmp_path / "n01" / "labels.txt").write_text("not an image, ignored")
    (tmp_path / "empty_class").mkdir()  # no images: not a class

    r = scan_dataset(str(tmp_path), progress=False)
    assert r.root == str(tmp_path) and r.classes == ["n01", "n02"]
    rel = [os.path.relpath(f, tmp_path) for f in r.files]
    assert rel == ["n01/sub/y.PNG", "n01/z.jpg", "n02/a.jpeg", "n02/b.JPEG"]
    assert all(os.path.isabs(f) for f in r.files)
    assert r.labels == [0, 0, 1, 1] and r.bad == []


def test_flat_layout(tmp_path):
    for name in ["c.jpg", "a.JPG", "b.png"]:
        if name.endswith("png"):
            noisy_rgb().save(tmp_path / name)
        else:
            jpeg(tmp_path / name)
    (tmp_path / "notes").mkdir()  # a subfolder without images does not make it a class layout
    (tmp_path / "notes" / "n.txt").write_text("x")
    r = scan_dataset(str(tmp_path), progress=False)
    assert [os.path.basename(f) for f in r.files] == ["a.JPG", "b.png", "c.jpg"]
    assert r.classes == ["."] and r.labels == [0, 0, 0]


def test_check_image_accepts_valid_variants_and_rejects_broken_files(tmp_path):
    img = noisy_rgb()
    img.save(tmp_path / "rgb.jpg")
    img.convert("L").save(tmp_path / "grey.jpg")
    img.convert("CMYK").save(tmp_path / "cmyk.jpg")
    img.save(tmp_path / "progressive.jpg", progressive=True)
    img.convert("P").save(tmp_path / "palette.png")
    img.convert("LA").save(tmp_path / "grey_alpha.png")
    data = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "padded.jpg").write_bytes(data + b"\0" * 200)  # bytes after EOI are common
    for name in ["rgb", "grey", "cmyk", "progressive", "padded"]:
        assert check_image(str(tmp_path / f"{name}.jpg")) is None, name
    for name in ["palette", "grey_alpha"]:
        assert check_image(str(tmp_path / f"{name}.png")) is None, name

    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert "truncated JPEG" in check_image(str(tmp_path / "truncated.jpg"))
    png = (tmp_path / "palette.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[:-20])
    assert "truncated PNG" in check_image(str(tmp_path / "truncated.png"))
    # A corrupted PNG chunk (CRC mismatch) is found by PIL's verify().
    broken = bytearray(png)
    broken[40] ^= 0xFF
    (tmp_path / "crc.png").write_bytes(bytes(broken))
    assert "bad PNG" in check_image(str(tmp_path / "crc.png"))
    # A JPEG header cut short but with an EOI at the end: PIL cannot parse it.
    (tmp_path / "header.jpg").write_bytes(data[:20] + b"\xff\xd9")
    assert "bad JPEG header" in check_image(str(tmp_path / "header.jpg"))
    img.save(tmp_path / "gif.jpg", format="GIF")
    assert check_image(str(tmp_path / "gif.jpg")) == "unsupported format (GIF)"
    (tmp_path / "text.jpg").write_text("hello")
    assert check_image(str(tmp_path / "text.jpg")) == "not an image (text)"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert check_image(str(tmp_path / "empty.jpg")) == "empty file"


def test_bad_files_are_reported_and_left_out(tmp_path):
    good = [jpeg(tmp_path / "c" / f"{i}.jpg") for i in range(8)]
    data = open(good[0], "rb").read()
    (tmp_path / "c" / "cut.jpg").write_bytes(data[:100])
    (tmp_path / "c" / "words.jpg").write_text("just text")
    r = scan_dataset(str(tmp_path), progress=False)
    assert r.files == sorted(good)
    assert [(os.path.basename(p), why) for p, why in r.bad] == [
        ("cut.jpg", "truncated JPEG (no end marker)"),
        ("words.jpg", "not an image (text)"),
    ]
    assert format_bad(r) == (
        "2 of 10 files left out: c/cut.jpg (truncated JPEG (no end marker)), c/words.jpg (not an image (text))"
    )
    assert format_bad(r, limit=1).endswith("and 1 more")


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for i in range(5):
        jpeg(root / "a" / f"{i}.jpg")
    (root / "a" / "bad.jpg").write_text("x")
    first = scan_dataset(str(root), progress=False)
    assert not first.from_cache and first.cache_path == str(root / scan.CACHE_NAME)
    assert os.path.exists(first.cache_path)

    # Second call: no file is opened again.
    def no_check(path):
        raise AssertionError(f"{path} checked again although the folder did not change")

    monkeypatch.setattr(scan, "check_image", no_check)
    second = scan_dataset(str(root), progress=False)
    assert second.from_cache
    assert (second.files, second.labels, second.classes, second.bad) == (
        first.files,
        first.labels,
        first.classes,
        first.bad,
    )
    monkeypatch.undo()

    # Adding a file changes the fingerprint: a fresh scan that finds it.
    new = jpeg(root / "a" / "new.jpg")
    third = scan_dataset(str(root), progress=False)
    assert not third.from_cache and new in third.files and len(third.files) == 6

    # Rewriting a file in place (here: truncating it) also invalidates the cache.
    data = open(new, "rb").read()
    with open(new, "wb") as f:
        f.write(data[:50])
    os.utime(new, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    fourth = scan_dataset(str(root), progress=False)
    assert not fourth.from_cache and new not in fourth.files
    assert new in [p for p, _ in fourth.bad]


def test_cache_dir_and_unwritable_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    jpeg(root / "x.jpg")
    cache_dir = tmp_path / "cache"
    r = scan_dataset(str(root), cache_dir=str(cache_dir), progress=False)
    assert os.path.dirname(r.cache_path) == str(cache_dir) and os.path.exists(r.cache_path)
    assert not os.path.exists(root / scan.CACHE_NAME)
    assert scan_dataset(str(root), cache_dir=str(cache_dir), progress=False).from_cache

    # If the cache cannot be written the scan still succeeds, with a note.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(scan, "write_atomic", refuse)
    r = scan_dataset(str(root), progress=False)
    assert r.files == [str(root / "x.jpg")] and r.cache_path is None
    assert r.notes and "not written" in r.notes[0]


def test_progress_bar_and_worker_processes_give_the_same_result(tmp_path, monkeypatch):
    for i in range(12):
        jpeg(tmp_path / f"{i:02d}.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    monkeypatch.setattr(scan, "PROGRESS_MIN_FILES", 1)
    monkeypatch.setattr(scan, "PROCESS_MIN_FILES", 1)  # as for a large data set
    with_bar = scan_dataset(str(tmp_path), num_workers=2, progress=True, cache_dir=str(tmp_path / "c1"))
    quiet = scan_dataset(str(tmp_path), num_workers=1, progress=False, cache_dir=str(tmp_path / "c2"))
    assert len(with_bar.files) == 12 and len(with_bar.bad) == 1
    assert (with_bar.files, with_bar.bad) == (quiet.files, quiet.bad)


def test_link_loops_broken_links_and_undecodable_names_are_left_out_and_reported(tmp_path):
    """None of these stops the scan: each is reported with the bad files, the rest of the set is usable."""
    import os

    from PIL import Image

    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(root / "cat" / f"{i}.jpg")
    os.symlink(root, root / "cat" / "loop")  # a folder link back up the tree
    os.symlink(root / "cat" / "gone.jpg", root / "cat" / "broken.jpg")  # points at nothing
    bad_name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    Image.new("RGB", (16, 16)).save(os.path.join(os.fsencode(root / "cat"), b"caf\xe9.jpg"))
    result = scan_dataset(str(root), progress=False)
    assert [os.path.basename(f) for f in result.files] == ["0.jpg", "1.jpg", "2.jpg"] and result.classes == ["cat"]
    reasons = {os.path.relpath(p, root): why for p, why in result.bad}
    assert reasons["cat/loop"].startswith("symbolic-link loop")
    assert reasons["cat/broken.jpg"] == "broken symbolic link"
    assert reasons["cat/caf\\xe9.jpg"] == "its name is not valid UTF-8" and bad_name not in reasons
    assert scan_dataset(str(root), progress=False).bad == result.bad  # the cache keeps them
