"""Sample data: an ImageNet-like folder of real-photo JPEGs, made offline and idempotently."""

from __future__ import annotations

import os

import pytest
from PIL import Image

pytest.importorskip("skimage")

from mae_fast.pipelines.sample_data import make_sample_data  # noqa: E402
from mae_fast.pipelines.scan import scan_dataset  # noqa: E402


def test_make_sample_data(tmp_path):
    out = str(tmp_path / "sample")
    assert make_sample_data(out, n=12, num_classes=3, seed=1) == out
    result = scan_dataset(out, progress=False)
    assert result.classes == ["class_0", "class_1", "class_2"] and result.bad == []
    assert len(result.files) == 12 and result.labels == [0] * 4 + [1] * 4 + [2] * 4
    sizes = []
    for f in result.files:
        assert f.endswith(".JPEG")
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.append(im.size)
    assert all(300 <= min(s) and max(s) <= 560 for s in sizes)  # about 500x375
    assert len(set(sizes)) > 1  # random sizes

    # Idempotent: nothing is rewritten; a missing file is restored identically.
    mtimes = {f: os.stat(f).st_mtime_ns for f in result.files}
    five = os.path.join("class_2", "img_000005.JPEG")  # image 5 goes to class 5 % 3
    first = open(os.path.join(out, five), "rb").read()
    os.remove(os.path.join(out, five))
    make_sample_data(out, n=12, num_classes=3, seed=1)
    assert open(os.path.join(out, five), "rb").read() == first
    assert all(os.stat(f).st_mtime_ns == t for f, t in mtimes.items() if not f.endswith(five))
    # Another seed gives other images.
    other = make_sample_data(str(tmp_path / "other"), n=12, num_classes=3, seed=2)
    assert open(os.path.join(other, five), "rb").read() != first


def test_a_link_planted_where_a_temporary_file_went_is_never_written_through(tmp_path):
    out = tmp_path / "sample"
    (out / "class_0").mkdir(parents=True)
    precious = tmp_path / "precious"
    precious.write_text("untouched")
    (out / "class_0/img_000000.JPEG.tmp").symlink_to(precious)  # the name the writer used before
    make_sample_data(str(out), n=2, num_classes=1, seed=0)
    assert precious.read_text() == "untouched"
    assert sorted(p.name for p in (out / "class_0").iterdir() if not p.is_symlink()) == sorted(
        os.path.basename(f) for f in scan_dataset(str(out), progress=False).files
    )
