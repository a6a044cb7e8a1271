"""The DALI pipeline on the CPU: order, sharding, augmentation geometry, statistics, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import broken_huffman_copy
from PIL import Image

pytest.importorskip("nvidia.dali")

from mae_fast.pipelines.common import Augmentation, epoch_order  # noqa: E402
from mae_fast.pipelines.dali import DaliLoader, dali_available  # noqa: E402
from mae_fast.pipelines.scan import scan_dataset  # noqa: E402

SIZE = 64  # output size for the tests: small, so the CPU pipeline is quick
THREADS = 2
AUG = Augmentation()

# ---------------------------------------------------------------- data sets

LEVELS = (0, 85, 170, 255)  # 4 levels per channel: 64 codes, 85 apart, far beyond JPEG error


def index_colour(i: int) -> tuple[int, int, int]:
    return LEVELS[i // 16 % 4], LEVELS[i // 4 % 4], LEVELS[i % 4]


def write_index_images(folder, n: int) -> list[str]:
    """n small solid-colour JPEGs whose colour encodes their index."""
    os.makedirs(folder, exist_ok=True)
    files = []
    for i in range(n):
        path = os.path.join(folder, f"{i:03d}.jpg")
        Image.new("RGB", (40, 30), index_colour(i)).save(path, quality=95)
        files.append(path)
    return files


def decode_indices(batch: torch.Tensor, aug: Augmentation = AUG) -> list[int]:
    """Index of each image of a float16 (N, 3, H, W) batch, after un-normalizing."""
    x = batch.float()
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(aug.std).view(1, 3, 1, 1) * 255
    rgb = (x * std + mean).mean((2, 3))  # (N, 3) average colour
    levels = torch.tensor(LEVELS, dtype=torch.float32)
    code = (rgb[:, :, None] - levels).abs().argmin(-1)  # (N, 3) level per channel
    assert ((rgb - levels[code]).abs() < 20).all(), "colour far from every level"
    return (code[:, 0] * 16 + code[:, 1] * 4 + code[:, 2]).tolist()


@pytest.fixture(scope="module")
def index_files(tmp_path_factory) -> list[str]:
    return write_index_images(tmp_path_factory.mktemp("index"), 43)  # 43: leaves a remainder


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[str]:
    pytest.importorskip("skimage")
    from mae_fast.pipelines.sample_data import make_sample_data

    root = make_sample_data(str(tmp_path_factory.mktemp("photos")), n=128, num_classes=2)
    return scan_dataset(root, progress=False).files


def epoch_batches(loader) -> list[torch.Tensor]:
    """One epoch, cloned (a yielded batch belongs to DALI once the next is requested)."""
    return [b.clone() for b in loader]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- tests


def test_dali_available_says_whether_dali_imports(monkeypatch):
    import sys

    assert dali_available()
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # an import of it now raises ImportError
    assert not dali_available()


def test_output_shape_dtype_and_normalized_statistics(photo_files):
    loader = DaliLoader(photo_files, 16, AUG, input_size=SIZE, seed=0, num_threads=THREADS)
    assert len(loader) == 128 // 16
    batches = epoch_batches(loader)
    assert len(batches) == len(loader)
    for b in batches:
        assert b.shape == (16, 3, SIZE, SIZE) and b.dtype == torch.float16
        assert b.device.type == "cpu" and b.is_contiguous()
    x = torch.cat(batches).float()
    assert torch.isfinite(x).all()
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    # Normalized: near 0 and 1 on photographs ...
    assert (mean.abs() < 0.5).all() and ((std > 0.7) & (std < 1.5)).all(), (mean, std)
    # ... and exactly what (pixel / 255 - mean) / std of the source files gives, up to cropping.
    pixels = (
        np.concatenate([np.asarray(Image.open(f).convert("RGB").reduce(4)).reshape(-1, 3) for f in photo_files]) / 255.0
    )
    expected = (pixels - np.array(AUG.mean)) / np.array(AUG.std)
    assert np.allclose(mean.numpy(), expected.mean(0), atol=0.08), (mean, expected.mean(0))
    assert np.allclose(std.numpy(), expected.std(0), atol=0.12), (std, expected.std(0))


def test_uint8_output_is_the_unnormalized_float_output(photo_files):
    files = photo_files[:32]
    f16 = next(iter(DaliLoader(files, 8, AUG, input_size=SIZE, seed=3, num_threads=THREADS))).clone()
    u8 = next(
        iter(DaliLoader(files, 8, AUG, input_size=SIZE, seed=3, num_threads=THREADS, output_dtype="uint8"))
    ).clone()
    assert u8.dtype == torch.uint8 and u8.shape == (8, 3, SIZE, SIZE)
    mean = torch.tensor(AUG.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(AUG.std).view(1, 3, 1, 1) * 255
    expected = (u8.float() - mean) / std
    assert torch.allclose(f16.float(), expected, atol=2e-3 * 4)  # float16 rounding at |x| <= 2.7


def test_epoch_order_sharding_and_seeds(index_files):
    n, B = len(index_files), 4  # 43 files, 2 shards: 5 batches each, 3 files left out
    shards = [
        DaliLoader(index_files, B, AUG, input_size=SIZE, seed=7, shard_id=k, num_shards=2, num_threads=THREADS)
        for k in range(2)
    ]
    assert [len(s) for s in shards] == [5, 5]
    seen = []
    for loader in shards:
        batches = epoch_batches(loader)
        assert len(batches) == 5 and all(b.shape == (B, 3, SIZE, SIZE) for b in batches)
        indices = [i for b in batches for i in decode_indices(b)]
        # The pipeline follows the planned order exactly.
        assert indices == loader.epoch_order(0).ravel().tolist()
        assert len(set(indices)) == len(indices) == 20  # each image at most once
        seen.append(set(indices))
    assert not seen[0] & seen[1]  # disjoint shards
    assert seen[0] | seen[1] <= set(range(n)) and len(seen[0] | seen[1]) == n - n % (2 * B)

    # Iterating again without set_epoch goes on with epoch 1: a new order, still a partition.
    loader = shards[0]
    epoch1 = [i for b in epoch_batches(loader) for i in decode_indices(b)]
    assert loader.epoch == 1
    assert epoch1 == loader.epoch_order(1).ravel().tolist()
    assert epoch1 != loader.epoch_order(0).ravel().tolist()
    union1 = set(epoch_order(n, B, seed=7, epoch=1, shard_id=0, num_shards=2).ravel()) | set(
        epoch_order(n, B, seed=7, epoch=1, shard_id=1, num_shards=2).ravel()
    )
    assert len(union1) == 40

    # Same seed: the same batches, bit for bit. Another seed: another order.
    again = DaliLoader(index_files, B, AUG, input_size=SIZE, seed=7, shard_id=0, num_shards=2, num_threads=THREADS)
    other = DaliLoader(index_files, B, AUG, input_size=SIZE, seed=8, shard_id=0, num_shards=2, num_threads=THREADS)
    first = DaliLoader(index_files, B, AUG, input_size=SIZE, seed=7, shard_id=0, num_shards=2, num_threads=THREADS)
    assert same(epoch_batches(again), epoch_batches(first))
    other_order = [i for b in epoch_batches(other) for i in decode_indices(b)]
    assert other_order != first.epoch_order(0).ravel().tolist()
    assert other_order == other.epoch_order(0).ravel().tolist()


def test_set_epoch_jump_is_reproducible(index_files):
    a = DaliLoader(index_files, 4, AUG, input_size=SIZE, seed=1, num_threads=THREADS)
    b = DaliLoader(index_files, 4, AUG, input_size=SIZE, seed=1, num_threads=THREADS)
    next(iter(a))  # a has a pipeline streaming epoch 0; the jump must drop it
    a.set_epoch(5)
    b.set_epoch(5)
    batches_a, batches_b = epoch_batches(a), epoch_batches(b)
    assert same(batches_a, batches_b)
    assert [i for x in batches_a for i in decode_indices(x)] == a.epoch_order(5).ravel().tolist()


def test_capped_epoch_streams_on_without_rebuild(index_files):
    loader = DaliLoader(index_files, 4, AUG, input_size=SIZE, seed=3, num_threads=THREADS, batches_per_epoch=2)
    assert len(loader) == 2  # 10 full batches, capped
    assert len(DaliLoader(index_files, 4, AUG, input_size=SIZE, seed=3, batches_per_epoch=99)) == 10
    e0 = [i for b in epoch_batches(loader) for i in decode_indices(b)]
    pipe = loader._pipe
    loader.set_epoch(1)
    e1 = [i for b in epoch_batches(loader) for i in decode_indices(b)]
    assert loader._pipe is pipe  # the prefetching pipeline ran on into epoch 1
    full = DaliLoader(index_files, 4, AUG, input_size=SIZE, seed=3).epoch_order
    assert e0 == full(0)[:2].ravel().tolist() and e1 == full(1)[:2].ravel().tolist()


def _gradient_image(path, W: int = 320, H: int = 240) -> None:
    """Red encodes x (0..255 across the width), green encodes y: a crop is read off its colours."""
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=100, subsampling=0)


def _crop_geometry(batch: torch.Tensor, W: int, H: int) -> tuple[np.ndarray, np.ndarray]:
    """(area fraction, width/height) of each crop, from the slopes of red along x and green along y."""
    x = batch.float().numpy()  # (N, 3, S, S), no flip
    S = x.shape[-1]
    cols = np.arange(4, S - 4)  # leave out the borders, where the cubic filter clamps
    red = x[:, 0].mean(1)[:, cols]  # (N, len(cols)) red along the output width
    green = x[:, 1].mean(2)[:, cols]
    slope_r = np.polyfit(cols, red.T, 1)[0]  # red units per output pixel
    slope_g = np.polyfit(cols, green.T, 1)[0]
    w = slope_r * (W - 1) / 255 * S  # crop width in source pixels
    h = slope_g * (H - 1) / 255 * S
    return w * h / (W * H), w / h


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.3, 0.4)])
def test_crop_area_and_aspect_ratio_stay_in_range(tmp_path, scale):
    path = str(tmp_path / "gradient.jpg")
    _gradient_image(path)
    aug = Augmentation(crop_scale=scale, hflip_prob=0.0)
    loader = DaliLoader([path] * 64, 64, aug, input_size=SIZE, seed=11, num_threads=THREADS, output_dtype="uint8")
    area, ratio = _crop_geometry(next(iter(loader)), 320, 240)
    lo, hi = scale
    assert area.min() > lo * 0.95 and area.max() < hi * 1.05, (area.min(), area.max())
    assert ratio.min() > 0.75 * 0.96 and ratio.max() < 4 / 3 * 1.04, (ratio.min(), ratio.max())
    # The draws spread over the range (DALI's default area range, 0.08..1, would fail above).
    assert area.max() - area.min() > 0.6 * (hi - lo)
    assert ratio.max() - ratio.min() > 0.3


def test_flip_mirrors_the_same_crop(photo_files):
    files = photo_files[:16]

    def first_batch(p: float) -> torch.Tensor:
        aug = Augmentation(hflip_prob=p)
        return next(iter(DaliLoader(files, 16, aug, input_size=SIZE, seed=5, num_threads=THREADS))).clone()

    never, always, half = first_batch(0.0), first_batch(1.0), first_batch(0.5)
    assert torch.equal(always, never.flip(-1))  # same seed: same crops, only mirrored
    assert not torch.equal(always, never)
    flipped = [torch.equal(half[i], never[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(half[i], never[i]) for i in range(16)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each image is one or the other
    assert 0 < sum(flipped) < 16


def test_dali_and_pil_agree_on_statistics(photo_files):
    pytest.importorskip("torchvision")
    from mae_fast.pipelines.pil import PilLoader

    dali = torch.cat(epoch_batches(DaliLoader(photo_files, 32, AUG, input_size=SIZE, seed=0, num_threads=THREADS)))
    pil = torch.cat(list(PilLoader(photo_files, 32, AUG, input_size=SIZE, seed=0, num_workers=0)))
    assert pil.shape == dali.shape and pil.dtype == torch.float32
    dali = dali.float()
    for stat in (lambda x: x.mean((0, 2, 3)), lambda x: x.std((0, 2, 3))):
        assert torch.allclose(stat(dali), stat(pil), atol=0.08), (stat(dali), stat(pil))


def test_reads_grey_cmyk_png_and_scan_drops_the_bad(tmp_path):
    rgb = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg")
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    data = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")

    result = scan_dataset(str(tmp_path), progress=False)
    assert sorted(os.path.basename(p) for p, _ in result.bad) == ["notes.jpg", "truncated.jpg"]
    names = [os.path.basename(f) for f in result.files]
    assert sorted(names) == ["cmyk.jpg", "grey.jpg", "rgb.jpg", "rgba.png"]

    loader = DaliLoader(result.files, 4, AUG, input_size=SIZE, seed=0, num_threads=THREADS, output_dtype="uint8")
    (batch,) = epoch_batches(loader)
    assert batch.shape == (4, 3, SIZE, SIZE)
    by_name = {names[i]: batch[k] for k, i in enumerate(loader.epoch_order(0)[0])}
    grey = by_name["grey.jpg"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # decoded as RGB
    for name in ("rgb.jpg", "cmyk.jpg", "rgba.png"):
        assert not torch.equal(by_name[name][0], by_name[name][1])  # colour kept


def test_resume_mid_epoch_gives_identical_batches(photo_files):
    files = photo_files[:64]

    def make(seed: int = 2):
        return DaliLoader(files, 8, AUG, input_size=SIZE, seed=seed, num_threads=THREADS)

    # Uninterrupted: all of epoch 0, then epoch 1.
    ref = make()
    ref_e0 = epoch_batches(ref)
    ref.set_epoch(1)
    ref_e1 = epoch_batches(ref)

    # Interrupted after 3 batches; the state goes through JSON, as in a checkpoint file.
    run = make()
    it = iter(run)
    head = [next(it).clone() for _ in range(3)]
    state = json.loads(json.dumps(run.state()))
    assert (state["epoch"], state["batch"]) == (0, 3)
    del run, it

    resumed = make()
    resumed.load_state(state)
    resumed.set_epoch(0)  # what a train loop does first: must keep the position
    tail = epoch_batches(resumed)
    assert same(head + tail, ref_e0)
    end_state = json.loads(json.dumps(resumed.state()))  # at the end of epoch 0
    resumed.set_epoch(1)
    assert same(epoch_batches(resumed), ref_e1)

    # Resuming from the end of an epoch continues with the next one.
    at_end = make()
    at_end.load_state(end_state)
    at_end.set_epoch(1)
    assert same(epoch_batches(at_end), ref_e1)

    with pytest.raises(ValueError, match="seed"):
        make(seed=3).load_state(state)


# ---------------------------------------------------------------- GPU ("mixed" decoding)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gpu_mixed_decoding_matches_cpu_pipeline(photo_files):
    gpu = DaliLoader(photo_files, 32, AUG, input_size=SIZE, seed=0, device_id=0, num_threads=4, hw_decoder_load=0.7)
    batches = epoch_batches(gpu)
    assert len(batches) == len(gpu) == 4
    assert all(b.device == torch.device("cuda", 0) and b.dtype == torch.float16 for b in batches)
    assert all(b.shape == (32, 3, SIZE, SIZE) for b in batches)
    x = torch.cat(batches).float().cpu()
    y = torch.cat(epoch_batches(DaliLoader(photo_files, 32, AUG, input_size=SIZE, seed=0, num_threads=4))).float()
    assert torch.isfinite(x).all()
    assert torch.allclose(x.mean((0, 2, 3)), y.mean((0, 2, 3)), atol=0.08)
    assert torch.allclose(x.std((0, 2, 3)), y.std((0, 2, 3)), atol=0.08)


@pytest.mark.gpu
@needs_cuda
def test_gpu_order_resume_and_odd_formats(index_files, photo_files, tmp_path):
    loader = DaliLoader(index_files, 4, AUG, input_size=SIZE, seed=7, device_id=0, shard_id=1, num_shards=2)
    order = [i for b in epoch_batches(loader) for i in decode_indices(b.cpu())]
    assert order == loader.epoch_order(0).ravel().tolist()

    def make():
        return DaliLoader(photo_files[:64], 8, AUG, input_size=SIZE, seed=2, device_id=0)

    ref = epoch_batches(make())
    run = make()
    it = iter(run)
    head = [next(it).clone() for _ in range(3)]
    state = json.loads(json.dumps(run.state()))
    del run, it
    resumed = make()
    resumed.load_state(state)
    assert same(head + epoch_batches(resumed), ref)

    rgb = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg")
    files = scan_dataset(str(tmp_path), progress=False).files
    (batch,) = epoch_batches(DaliLoader(files, 4, AUG, input_size=SIZE, seed=0, device_id=0, output_dtype="uint8"))
    assert batch.shape == (4, 3, SIZE, SIZE) and batch.dtype == torch.uint8 and batch.is_cuda


def test_decoder_choice_is_checked():
    from mae_fast.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="data.decoder: must be auto, mixed or cpu, got 'gpu'"):
        config_from_dict({"data": {"decoder": "gpu"}})
    # without a GPU everything runs on the CPU, whatever the decoder setting
    assert not DaliLoader(["a.jpg"] * 8, 4, Augmentation(), input_size=SIZE, seed=0).gpu_decode


def test_undecodable_file_is_left_out_during_training_and_stays_out(tmp_path):
    good = write_index_images(tmp_path, 11)
    bad = str(tmp_path / "005b.jpg")  # sorts right after 005.jpg: read in its place is 006.jpg
    broken_huffman_copy(good[5], bad)
    scanned = scan_dataset(str(tmp_path), progress=False)
    assert bad in scanned.files and not scanned.bad  # the cheap scan cannot see it
    files = scanned.files
    loader = DaliLoader(files, 4, AUG, input_size=SIZE, seed=0, num_threads=THREADS)

    counts = np.zeros(11, int)
    for batch in epoch_batches(loader):  # 3 full batches: every file once, 005b.jpg included
        for i in decode_indices(batch):
            counts[i] += 1
    assert len(loader) == 3
    expected = np.ones(11, int)
    expected[6] = 2  # 006.jpg read twice: once for itself, once in the place of 005b.jpg
    assert counts.tolist() == expected.tolist()
    ((path, reason),) = loader.take_bad_files()
    assert path == bad and reason
    assert loader.substitutes == {files.index(bad): files.index(bad) + 1}

    # later epochs, and a loader resumed from the state, never read it again
    loader.set_epoch(1)
    assert len(epoch_batches(loader)) == 3 and loader.take_bad_files() == []
    state = json.loads(json.dumps(loader.state()))
    resumed = DaliLoader(files, 4, AUG, input_size=SIZE, seed=0, num_threads=THREADS)
    resumed.load_state(state)
    resumed.set_epoch(2)
    assert len(epoch_batches(resumed)) == 3 and resumed.take_bad_files() == []
