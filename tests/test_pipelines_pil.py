"""The PIL reference loader: MAE's transform, the shared epoch order, sharding, position resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import broken_huffman_copy
from PIL import Image

pytest.importorskip("torchvision")

from mae_fast.pipelines.common import Augmentation  # noqa: E402
from mae_fast.pipelines.pil import PilLoader, pil_transform  # noqa: E402

SIZE = 32
AUG = Augmentation()
LEVELS = (0, 85, 170, 255)


def index_colour(i: int) -> tuple[int, int, int]:
    return LEVELS[i // 16 % 4], LEVELS[i // 4 % 4], LEVELS[i % 4]


def decode_indices(batch: torch.Tensor) -> list[int]:
    mean = torch.tensor(AUG.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(AUG.std).view(1, 3, 1, 1) * 255
    rgb = (batch * std + mean).mean((2, 3))
    levels = torch.tensor(LEVELS, dtype=torch.float32)
    code = (rgb[:, :, None] - levels).abs().argmin(-1)
    assert ((rgb - levels[code]).abs() < 20).all()
    return (code[:, 0] * 16 + code[:, 1] * 4 + code[:, 2]).tolist()


@pytest.fixture(scope="module")
def index_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("index")
    files = []
    for i in range(27):
        path = os.path.join(folder, f"{i:03d}.jpg")
        # Grey and palette images too: the dataset converts everything to RGB.
        img = Image.new("RGB", (40, 30), index_colour(i))
        if i == 0:
            img = img.convert("L")
        files.append(path)
        img.save(path, quality=95)
    return files


def test_transform_is_mae_main_pretrain():
    from torchvision import transforms

    t = pil_transform(Augmentation(crop_scale=(0.3, 0.9), hflip_prob=0.25), 48)
    crop, flip, to_tensor, norm = t.transforms
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.size == (48, 48)
    assert crop.scale == (0.3, 0.9) and crop.ratio == (3 / 4, 4 / 3)
    assert crop.interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.25
    assert isinstance(to_tensor, transforms.ToTensor)
    assert isinstance(norm, transforms.Normalize) and list(norm.std) == AUG.std


def test_order_shards_and_resume_position(index_files):
    B = 3  # 27 files, 2 shards: 4 batches of 3 each, 3 files left out
    shards = [
        PilLoader(index_files, B, AUG, input_size=SIZE, seed=4, shard_id=k, num_shards=2, num_workers=0)
        for k in range(2)
    ]
    seen = []
    for loader in shards:
        assert len(loader) == 4
        batches = list(loader)
        assert len(batches) == 4
        assert all(b.shape == (B, 3, SIZE, SIZE) and b.dtype == torch.float32 for b in batches)
        indices = [i for b in batches for i in decode_indices(b)]
        assert indices == loader.epoch_order(0).ravel().tolist()
        seen.append(set(indices))
        assert len(seen[-1]) == 12
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24

    loader = shards[0]
    loader.set_epoch(1)
    it = iter(loader)
    head = [decode_indices(next(it)) for _ in range(2)]
    state = json.loads(json.dumps(loader.state()))
    assert (state["epoch"], state["batch"]) == (1, 2)
    resumed = PilLoader(index_files, B, AUG, input_size=SIZE, seed=4, shard_id=0, num_shards=2, num_workers=0)
    resumed.load_state(state)
    resumed.set_epoch(1)  # keeps the position
    tail = [decode_indices(b) for b in resumed]
    assert head + tail == loader.epoch_order(1).tolist()
    assert loader.epoch_order(1).tolist() != loader.epoch_order(0).tolist()
    with pytest.raises(ValueError, match="shard_id"):
        shards[1].load_state(state)


def test_workers_and_device(index_files):
    loader = PilLoader(index_files, 9, AUG, input_size=SIZE, seed=0, num_workers=2, device="cpu")
    batches = list(loader)
    assert len(batches) == 3 and all(b.device.type == "cpu" for b in batches)
    assert sorted(i for b in batches for i in decode_indices(b)) == list(range(27))
    loader.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_file_is_left_out_and_replaced(tmp_path, workers):
    files = []
    for i in range(11):
        path = str(tmp_path / f"{i:03d}.jpg")
        Image.new("RGB", (40, 30), index_colour(i)).save(path, quality=95)
        files.append(path)
    bad = str(tmp_path / "005b.jpg")
    broken_huffman_copy(files[5], bad)  # the header still parses
    files.insert(6, bad)  # read in its place: 006.jpg, the next file
    loader = PilLoader(files, 4, AUG, input_size=SIZE, seed=0, num_workers=workers)
    counts = [0] * 11
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.shape == (4, 3, SIZE, SIZE)
            for i in decode_indices(batch):
                counts[i] += 1
        found = loader.take_bad_files()
        assert [p for p, _ in found] == ([bad] if epoch == 0 else [])
    assert counts == [2] * 6 + [4] + [2] * 4  # every file once per epoch, 006.jpg also in the place of 005b.jpg
    assert json.loads(json.dumps(loader.state()))["substitutes"] == [[6, 7]]
    loader.close()
