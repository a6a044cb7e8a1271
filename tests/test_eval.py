"""Evaluation: the DALI eval pipeline, DINO's weighted kNN, MAE's linear probe, the labelled folders, checkpoint
formats, the collective the train loop calls (one and two ranks) and `mae-fast eval`."""

import argparse
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import broken_huffman_copy
from PIL import Image

from mae_fast.cli import main
from mae_fast.config import ConfigError, config_from_dict
from mae_fast.distributed import Dist
from mae_fast.evaluate import (
    EvalDataError,
    EvalOptions,
    Evaluator,
    evaluate,
    extract_features,
    on_main,
    scan_labelled,
)
from mae_fast.export import encoder_state_dict, export_timm
from mae_fast.model import build_model
from mae_fast.pipelines.eval_pipeline import EvalLoader, EvalTransform, eval_geometry
from mae_fast.probes import LabelledFeatures, knn_classify, knn_scores, linear_probe, subsample
from mae_fast.weights import load_encoder

CPU = torch.device("cpu")
COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 30), "white": (235, 235, 235)}


def colour_folder(root, per_class, seed, classes=None, misfile=False):
    """root/<class>/img_j.jpg: solid-colour images of their class's colour, a few brightness levels apart (a
    trivially separable set). misfile=True: image j of colour c goes into folder (c + j) % C instead, so every
    folder holds each colour equally often (labels that carry no signal)."""
    rng = np.random.default_rng(seed)
    names = classes or sorted(COLOURS)
    for c, name in enumerate(names):
        for j in range(per_class):
            folder = names[(c + j) % len(names)] if misfile else name
            rgb = np.clip(np.array(COLOURS[name]) + rng.integers(-12, 13), 0, 255)
            size = (int(rng.integers(36, 60)), int(rng.integers(36, 60)))
            path = root / folder / f"{name}_{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((size[1], size[0], 3), rgb, dtype=np.uint8)).save(path, quality=95)
    return str(root)


def smooth_image(w, h, seed, period=None):
    """Sinusoidal colour bands: content a resize must really resample (unlike a solid colour); `period`: bands about
    that many pixels apart (default: 1 to 4 bands across the image)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    lo, hi = (max(w, h) / period / 2, max(w, h) / period) if period else (1, 4)  # bands across the image
    bands = [np.sin(2 * np.pi * (rng.uniform(lo, hi) * x + rng.uniform(lo, hi) * y + rng.uniform())) for _ in range(3)]
    return (127.5 + 120 * np.stack(bands, -1)).astype(np.uint8)


@pytest.fixture
def colours(tmp_path):
    return colour_folder(tmp_path / "train", 6, seed=1), colour_folder(tmp_path / "val", 4, seed=2)


# ---------------------------------------------------------------- the pipeline


def test_eval_loader_gives_every_file_once_in_order(tmp_path):
    files = []
    for i in range(11):  # grey level 20 * i encodes the index; sizes and orientations vary
        w, h = (60, 40 + 3 * i) if i % 2 else (40 + 3 * i, 60)
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(np.full((h, w, 3), 20 * i, dtype=np.uint8)).save(files[-1], quality=95)
    loader = EvalLoader(files, 4, EvalTransform(32, (0, 0, 0), (1, 1, 1), "float32"), decoder="cpu")
    assert len(loader) == 3
    for _ in range(2):  # each pass starts again from the first file
        batches = [b.clone() for b in loader]
        assert [tuple(b.shape) for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (3, 3, 32, 32)]
        index = (torch.cat(batches).mean(dim=(1, 2, 3)) * 255 / 20).round().long()
        assert index.tolist() == list(range(11))


def test_eval_geometry_is_torchvisions_resize_and_centre_crop():
    """eval_geometry (the rule the DALI graph computes) against torchvision's own Resize(int(s / 0.875)) and
    CenterCrop(s): the resized size and the crop offsets, exactly, including odd margins (half-to-even rounding)
    and sizes where the longer side's truncation and rounding differ."""
    from torchvision import transforms as T

    for s in (32, 56, 64, 224):
        resize, crop = T.Resize(int(s / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s)
        for w, h in [(500, 375), (375, 500), (201, 151), (150, 203), (99, 77), (300, 300), (257, 256), (37, 300)]:
            rw, rh = resize(Image.new("RGB", (w, h))).size
            index = torch.arange(rh * rw).reshape(1, rh, rw)  # each pixel holds its own offset
            first = crop(index)[0, 0, 0].item()
            assert eval_geometry(w, h, s) == (rw, rh, first % rw, first // rw), (w, h, s)


def test_eval_transform_matches_torchvision(tmp_path):
    """The DALI pipeline against torchvision's Resize(int(s / 0.875), BICUBIC) + CenterCrop(s) on the CPU, in grey
    levels: at most 1 level apart anywhere (PIL's bicubic rounds its horizontal pass to 8 bits before the
    vertical one, DALI keeps it in float: the one difference two correct bicubic resamplers keep), while the
    same reference one pixel off is tens of levels away (so the geometry is exact). PNGs: the same pixels
    decoded on both sides."""
    from torchvision import transforms as T

    sizes = [(500, 375), (375, 500), (201, 151), (150, 203), (99, 77), (257, 256)]
    for s in (32, 56, 64):
        files, want = [], []
        reference = T.Compose([T.Resize(int(s / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s)])
        for i, (w, h) in enumerate(sizes):
            files.append(str(tmp_path / f"{s}_{i}.png"))
            Image.fromarray(smooth_image(w, h, i, period=9)).save(files[-1])
            want.append(torch.from_numpy(np.asarray(reference(Image.open(files[-1])), dtype=np.float32)))
        want = torch.stack(want).permute(0, 3, 1, 2)
        loader = EvalLoader(files, 8, EvalTransform(s, (0, 0, 0), (1 / 255,) * 3, "float32"))
        (got,) = [b.clone() for b in loader]  # decoder: DALI's CPU one without a device
        err = (got - want).abs()
        assert err.max() <= 1.0 + 1e-3 and err.mean() < 0.3, (s, err.max(), err.mean())
        for shifted in ((got[..., 1:], want[..., :-1]), (got[..., 1:, :], want[..., :-1, :])):
            assert (shifted[0] - shifted[1]).abs().mean() > 10  # one pixel off is far outside the tolerance


# ---------------------------------------------------------------- kNN and the probe


def brute_force_knn(train, train_labels, val, num_classes, k, T):
    """DINO's weighted vote, one val feature at a time, straight from the formula."""
    out = torch.zeros(len(val), num_classes, dtype=torch.float64)
    train = train / train.norm(dim=1, keepdim=True)
    for i, v in enumerate(val):
        sim = train @ (v / v.norm())
        for j in sorted(range(len(train)), key=lambda j: -sim[j].item())[:k]:
            out[i, train_labels[j]] += torch.exp(sim[j] / T)
    return out


def test_knn_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(60, 12, generator=g, dtype=torch.float64), torch.randn(25, 12, generator=g).double()
    train_labels, val_labels = torch.randint(0, 5, (60,), generator=g), torch.randint(0, 5, (25,), generator=g)
    train[:, :5] += 2 * F.one_hot(train_labels, 5)  # some signal, so accuracies are not all zero
    val[:, :5] += 2 * F.one_hot(val_labels, 5)
    want = brute_force_knn(train, train_labels, val, 5, k=7, T=0.07)
    for chunk in (None, 1, 4):  # chunked over val rows or not: the same votes
        got = knn_scores(train, train_labels, val, 5, k=7, chunk=chunk)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    pred = want.argsort(dim=1, descending=True)
    top1 = 100 * (pred[:, 0] == val_labels).double().mean().item()
    top5 = 100 * (pred[:, :5] == val_labels[:, None]).any(1).double().mean().item()
    feats = LabelledFeatures(train, train_labels, val, val_labels, 5)
    assert knn_classify(feats, k=7, chunk=3) == pytest.approx((top1, top5))
    # k < 5: top-5 is top-k, as DINO's (only k classes have votes); k = 1: top-5 is top-1
    one = knn_classify(feats, k=1)
    assert one[0] == one[1] < 100
    pred3 = knn_scores(train, train_labels, val, 5, k=3).argsort(dim=1, descending=True)[:, :3]
    assert knn_classify(feats, k=3)[1] == pytest.approx(100 * (pred3 == val_labels[:, None]).any(1).double().mean())
    assert 0 < top1 < 100
    # fp32 features: the same votes to fp32 precision; a k beyond the bank is capped at the bank
    torch.testing.assert_close(
        knn_scores(train.float(), train_labels, val.float(), 5, k=7).double(), want, rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        knn_scores(train, train_labels, val, 5, k=1000), knn_scores(train, train_labels, val, 5, k=60)
    )


def clusters(n, num_classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    return centres[labels] + torch.randn(n, dim, generator=g) * 1.5 + 5.0, labels  # offset: BN must centre it


def test_linear_probe_beats_chance_and_is_deterministic():
    train, train_labels = clusters(200, 4, 16, seed=0)
    val, val_labels = clusters(100, 4, 16, seed=1)
    rng = torch.get_rng_state()
    first = linear_probe(LabelledFeatures(train, train_labels, val, val_labels, 4), seed=3, epochs=30)
    assert torch.equal(torch.get_rng_state(), rng)  # the global stream is untouched
    assert first[0] > 90 and first[1] == 100  # chance is 25%
    assert linear_probe(LabelledFeatures(train, train_labels, val, val_labels, 4), seed=3, epochs=30) == first
    # shuffled train labels: nothing to learn
    shuffled = train_labels[torch.randperm(200, generator=torch.Generator().manual_seed(5))]
    assert linear_probe(LabelledFeatures(train, shuffled, val, val_labels, 4), seed=3, epochs=30)[0] < 50


def test_subsample_is_uniform_seeded_and_sorted():
    a = subsample(100, 30, seed=1)
    assert len(set(a.tolist())) == 30 and list(a) == sorted(a) and a.max() < 100
    assert np.array_equal(a, subsample(100, 30, seed=1)) and not np.array_equal(a, subsample(100, 30, seed=2))
    assert np.array_equal(subsample(10, 0, seed=1), np.arange(10)) and len(subsample(10, 50, seed=1)) == 10


# ---------------------------------------------------------------- labelled folders


def test_labels_stay_aligned_with_their_images(tmp_path, colours, tiny_model):
    train, val = colours
    result = evaluate(tiny_model, train, val, EvalOptions(k=3, linear=True, batch_size=5))  # batches cut classes
    assert result.knn_top1 == 100.0 and result.linear_top1 == 100.0
    assert (result.num_train, result.num_val, result.num_classes, result.feature_dim) == (24, 16, 4, 64)
    # the same images with their val labels shuffled: each folder holds every colour once per 4 images
    misfiled = colour_folder(tmp_path / "misfiled", 4, seed=2, misfile=True)
    assert evaluate(tiny_model, train, misfiled, EvalOptions(k=3, batch_size=5)).knn_top1 == pytest.approx(25.0)


def test_val_classes_must_be_a_subset_of_train(tmp_path, colours, tiny_model, capsys):
    train, _ = colours
    some = colour_folder(tmp_path / "some", 3, seed=3, classes=["red", "white"])  # a subset: mapped by name
    sets = scan_labelled(train, some)
    assert sets.classes == ["blue", "green", "red", "white"] and sorted(set(sets.val_labels)) == [2, 3]
    assert evaluate(tiny_model, train, some, EvalOptions(k=3)).knn_top1 == 100.0
    extra = tmp_path / "extra"
    colour_folder(extra, 2, seed=4)
    (extra / "zebra").mkdir()
    Image.new("RGB", (40, 40), (128, 0, 128)).save(extra / "zebra" / "z.jpg")
    with pytest.raises(EvalDataError, match="no class subfolders"):
        scan_labelled(str(extra / "zebra"), train)  # a flat folder has no labels
    with pytest.raises(EvalDataError, match="zebra") as e:
        scan_labelled(train, str(extra))
    assert isinstance(e.value, ConfigError)
    assert main(["eval", "unused.pt", "--train", train, "--val", str(extra)]) == 2  # checked before any loading
    assert "zebra" in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_formats_give_the_same_features(tmp_path, colours, tiny_model):
    train, _ = colours
    files = scan_labelled(train, train).train_files[::3]
    cfg = config_from_dict({"model": {"type": "mae_vit_tiny_patch8"}, "data": {"input_size": 32}})
    sd = tiny_model.state_dict()
    paths = {
        "mae-fast": tmp_path / "final.pt",
        "official": tmp_path / "official.pth",
        "official-encoder": tmp_path / "encoder.pth",
        "timm-export": tmp_path / "encoder.safetensors",
    }
    torch.save({"format": "mae-fast", "model": sd, "config": cfg.to_dict(), "step": 10}, paths["mae-fast"])
    torch.save({"model": sd, "args": argparse.Namespace(model="mae_vit_tiny_patch8")}, paths["official"])
    torch.save({"model": encoder_state_dict(tiny_model)}, paths["official-encoder"])
    export_timm(tiny_model, "mae_vit_tiny_patch8", paths["timm-export"])
    want, skipped = extract_features(tiny_model, files)
    assert skipped == []
    for source, path in paths.items():
        loaded = load_encoder(path)
        assert (loaded.source, loaded.model_type, loaded.model.arch.img_size) == (source, "mae_vit_tiny_patch8", 32)
        assert loaded.step == (10 if source == "mae-fast" else None)
        torch.testing.assert_close(extract_features(loaded.model, files)[0], want, rtol=0, atol=1e-6)
    assert extract_features(tiny_model, files, EvalOptions(batch_size=2))[0].shape == (len(files), 64)


def test_eval_command_prints_and_writes_json(tmp_path, colours, tiny_model, capsys):
    train, val = colours
    cfg = config_from_dict({"model": {"type": "mae_vit_tiny_patch8"}, "data": {"input_size": 32}})
    ckpt = tmp_path / "final.pt"
    torch.save({"format": "mae-fast", "model": tiny_model.state_dict(), "config": cfg.to_dict(), "step": 10}, ckpt)
    out = tmp_path / "eval.json"
    args = ["eval", str(ckpt), "--train", train, "--val", val, "--k", "3", "--linear", "--max-train", "20"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kNN (k=3" in printed and "linear probe" in printed and "20 train / 16 val images, 4 classes" in printed
    record = json.loads(out.read_text())
    assert record["checkpoint"] == str(ckpt) and record["step"] == 10 and record["source"] == "mae-fast"
    assert record["knn_top1"] == 100.0 and record["linear_top1"] is not None and record["feature_dim"] == 64
    assert (record["num_train"], record["num_val"], record["num_classes"]) == (20, 16, 4)
    assert {"torch", "dali", "mae_fast"} <= set(record["versions"]) and record["seconds"] > 0


# ---------------------------------------------------------------- during training


def test_the_evaluator_in_training_one_process(colours, tiny_model):
    train, val = colours
    sets = scan_labelled(train, val, max_train=16, seed=0)
    assert len(sets.train_files) == 16 and "uniform random 16 of 24" in sets.notes[0]
    tiny_model.train()
    rng = torch.get_rng_state()
    options = EvalOptions(k=3, linear=True, input_size=32, batch_size=7, freq_epochs=2, last_epoch=5)
    evaluator = Evaluator(sets, options)
    assert [e for e in range(8) if evaluator.due(e)] == [2, 4, 5, 6]  # the baseline (0) is the trainer's call
    result = evaluator(tiny_model, 6, 1)
    assert (result.step, result.epoch, result.skipped) == (6, 1, ())
    assert set(result.scores()) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5", "eval_s"}
    assert tiny_model.training and torch.equal(torch.get_rng_state(), rng)
    assert result.knn_top1 == 100.0 and result.scores()["eval_s"] == result.seconds > 0
    plain = Evaluator(sets, EvalOptions(k=3, input_size=32, batch_size=7))(tiny_model, 0, 0)
    assert set(plain.scores()) == {"knn_top1", "knn_top5", "eval_s"} and plain.linear_top1 is None


def _rank(rank, world, store, train, val, bad_val, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    d = Dist(rank, rank, world)
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch8")
    options = EvalOptions(k=3, linear=True, input_size=32, batch_size=4)
    out = Evaluator(on_main(d, lambda: scan_labelled(train, val)), options, CPU, d)(model)
    # an undecodable val file in rank 1's block: left out on every rank alike, named in the result
    bad = Evaluator(on_main(d, lambda: scan_labelled(train, bad_val)), options, CPU, d)
    first, second = bad(model), bad(model)
    torch.save({"out": out, "bad": first, "again": second}, f"{results}/rank{rank}.pt")
    dist.destroy_process_group()


def test_the_evaluator_on_two_ranks_equals_one_process(tmp_path, colours, tiny_model):
    train, val = colours
    bad_val = tmp_path / "bad_val"
    colour_folder(bad_val, 3, seed=5)
    broken = bad_val / "white" / "zz_broken.jpg"
    broken_huffman_copy(bad_val / "white" / "white_2.jpg", broken)  # the last file
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), train, val, str(bad_val), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    timing = {"seconds", "extract_s"}  # each rank's own wall time
    for key in ("out", "bad", "again"):  # rank 0's numbers on both ranks
        a, b = r0[key].to_dict(), r1[key].to_dict()
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    single = Evaluator(scan_labelled(train, val), EvalOptions(k=3, linear=True, batch_size=4))(tiny_model)
    assert (r0["out"].knn_top1, r0["out"].knn_top5) == (single.knn_top1, single.knn_top5)
    assert r0["out"].linear_top1 == pytest.approx(single.linear_top1, abs=100 / 16 + 1e-9)  # one image at most
    assert r0["bad"].skipped == (str(broken),) and r0["bad"].num_val == 12 and r0["bad"].scores()["skipped"] == 1
    assert r0["again"].skipped == () and r0["again"].num_val == 12  # left out of the later evaluations


def test_labelled_sample_pair(tmp_path):
    pytest.importorskip("skimage")
    from mae_fast.pipelines.sample_data import make_labelled_sample

    out = make_labelled_sample(str(tmp_path / "s"), n_train=12, n_val=6, seed=0)
    sets = scan_labelled(f"{out}/train", f"{out}/val")
    assert len(sets.classes) == 6 and "astronaut" in sets.classes  # a class per photograph
    assert sorted(sets.train_labels) == sorted(list(range(6)) * 2) and sorted(sets.val_labels) == list(range(6))
    train_bytes = {open(f, "rb").read() for f in sets.train_files}
    assert not any(open(f, "rb").read() in train_bytes for f in sets.val_files)  # val images are not train images
    mtimes = [os.stat(f).st_mtime_ns for f in sets.val_files]
    make_labelled_sample(out, n_train=12, n_val=6, seed=0)  # idempotent: nothing rewritten
    assert [os.stat(f).st_mtime_ns for f in sets.val_files] == mtimes


# ---------------------------------------------------------------- in the train loop


def eval_run(tmp_path, colours, *extra):
    """The demo config on synthetic images: batch 32 of 96 images -> 3 steps per epoch, 32 px, eager; evaluation
    on the colour folders every 2 epochs (and at the end)."""
    from helpers import demo_cfg

    train_dir, val_dir = colours
    return demo_cfg(
        tmp_path,
        "data.backend=synthetic",
        "data.synthetic_images=96",
        "data.input_size=32",
        "misc.compile=false",
        "schedule.epochs=5",
        "schedule.warmup_epochs=1",
        "logging.print_freq=100",
        "logging.visualize_freq_epochs=0",
        "checkpointing.save_freq_epochs=0",
        f"evaluation.train_path={train_dir}",
        f"evaluation.val_path={val_dir}",
        "evaluation.freq_epochs=2",
        "evaluation.k=3",
        *extra,
    )


def records(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "kind" not in r], [r for r in rows if r.get("kind") == "eval"]


def test_training_evaluates_at_its_epochs_and_its_time_is_not_training_time(tmp_path, colours, monkeypatch):
    """Every 2nd epoch and at the end: a log line, a kind "eval" record, TensorBoard scalars. An evaluation made
    1 s slower stays out of the training intervals: the metrics are read right before it (a record at its step)
    and the interval after it is at most its wall time minus the evaluation's own eval_s."""
    import time

    from helpers import Recorder

    from mae_fast.model import MaskedAutoencoderViT
    from mae_fast.train import train

    real, models = Evaluator.__call__, []

    def slow(self, model, step, epoch):
        t0 = time.perf_counter()
        models.append(model)
        time.sleep(1.0)
        return dataclasses.replace(real(self, model, step, epoch), seconds=time.perf_counter() - t0)

    monkeypatch.setattr(Evaluator, "__call__", slow)
    lines = []
    cfg = eval_run(tmp_path, colours, "evaluation.linear_probe=true", "logging.tensorboard=true")
    result = train(cfg, log=lines.append, on_log=Recorder())
    assert result.steps_done == 15
    train_rows, evals = records(tmp_path / "out")
    # epochs done, from the baseline before the first step
    assert [(e["step"], e["epoch"]) for e in evals] == [(0, 0), (6, 2), (12, 4), (15, 5)]
    assert [(e.step, e.epoch) for e in result.evaluations] == [(0, 0), (6, 2), (12, 4), (15, 5)]
    keys = {"time", "step", "epoch", "knn_top1", "knn_top5", "linear_top1", "linear_top5", "eval_s", "kind"}
    for e in evals:
        assert set(e) == keys and e["knn_top1"] == 100.0 and e["linear_top1"] == 100.0 and e["eval_s"] >= 1.0
    assert all(type(m) is MaskedAutoencoderViT and m is models[0] for m in models)  # the uncompiled model
    assert sum(line.startswith("eval epoch ") for line in lines) == 4
    summary = next(x for x in lines if "kNN top-1:" in x)
    assert (
        "kNN top-1:       100.0% (epoch 0), 100.0% (epoch 2), 100.0% (epoch 4), 100.0% (epoch 5); +0.0 points from epoch 0"
        in summary
    )
    assert any(x.startswith("eval epoch 4: knn top-1 100.0% top-5 100.0% (linear top-1 100.0%") for x in lines)
    assert any("evaluation: kNN (k=3) and linear probe of the frozen encoder, 24 train / 16 val" in x for x in lines)
    assert lines.index(next(x for x in lines if x.startswith("eval epoch 0:"))) < lines.index(
        next(x for x in lines if x.startswith("first step done"))
    )  # the baseline comes before the first step and stays out of its time
    # training records as without evaluation (no "kind"), plus a read right before each evaluation
    assert [r["step"] for r in train_rows] == [1, 6, 12, 15] and all("kind" not in r for r in train_rows)
    at = {r["step"]: r for r in train_rows}
    for (a, b), e in zip([(6, 12), (12, 15)], evals[1:]):  # the intervals that follow an evaluation
        interval_s = 32 * (b - a) / at[b]["samples_per_s"]  # the time the rate is computed over
        assert interval_s == pytest.approx(at[b]["ms_per_iter"] * (b - a) / 1000, rel=1e-9)
        assert interval_s <= at[b]["elapsed_s"] - at[a]["elapsed_s"] - e["eval_s"] + 1e-6
    # TensorBoard: eval/* scalars at the evaluations' steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "out/tensorboard"))
    tb.Reload()
    assert {"eval/knn_top1", "eval/knn_top5", "eval/linear_top1", "eval/eval_s"} <= set(tb.Tags()["scalars"])
    assert [s.step for s in tb.Scalars("eval/knn_top1")] == [0, 6, 12, 15]


def test_evaluation_leaves_the_training_losses_as_they_are_and_a_resumed_run_gives_them(tmp_path, colours):
    """The same losses with and without evaluation (the RNG streams untouched), and after a stop and a resume
    between two evaluations (--max-steps leaves a checkpoint at step 8; epochs of 3 steps)."""
    from helpers import Recorder

    from mae_fast.train import train

    def losses(name, *extra, max_steps=None):
        rec = Recorder()
        cfg = eval_run(tmp_path / name, colours, "evaluation.freq_epochs=1", "evaluation.linear_probe=true", *extra)
        result = train(cfg, log=lambda line: None, on_log=rec, max_steps=max_steps)
        return rec.losses, result

    full, result = losses("full")
    assert len(full) == 15 and [e.epoch for e in result.evaluations] == [0, 1, 2, 3, 4, 5]
    assert losses("plain", "evaluation=null")[0] == full
    ckpt = f"checkpointing.checkpoint_dir={tmp_path}/resumed/ckpt"
    first, result = losses("resumed", ckpt, max_steps=8)
    assert [e.epoch for e in result.evaluations] == [0, 1, 2] and first == full[:8]
    rest, result = losses("resumed", ckpt, "misc.auto_resume=true", f"logging.output_dir={tmp_path}/resumed/out2")
    # a resumed run does not score its start again
    assert result.start_step == 8 and [e.epoch for e in result.evaluations] == [3, 4, 5]
    assert rest == full[8:]


@pytest.mark.slow
def test_two_ranks_train_with_evaluation_and_report_once(tmp_path, colours):
    import subprocess

    from test_distributed import TORCHRUN_ENV, torchrun_args

    from mae_fast.pipelines.sample_data import make_sample_data

    make_sample_data(str(tmp_path / "data"), n=64)  # batch 32 over 2 ranks: 2 steps per epoch
    train_dir, val_dir = colours
    extra = [f"evaluation.train_path={train_dir}", f"evaluation.val_path={val_dir}", "evaluation.freq_epochs=1"]
    extra += ["evaluation.k=3", "evaluation.linear_probe=true", "schedule.epochs=2"]
    args = torchrun_args(tmp_path, tmp_path / "out", *[a for x in extra for a in ("--set", x)])
    run = subprocess.run(args, capture_output=True, text=True, env=TORCHRUN_ENV, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("eval epoch 1: knn top-1 100.0%") == 1 and run.stdout.count("eval epoch 2: knn") == 1
    _, evals = records(tmp_path / "out")
    assert [(e["step"], e["epoch"], e["knn_top1"], e["linear_top1"]) for e in evals] == [
        (0, 0, 100.0, 100.0),
        (2, 1, 100.0, 100.0),
        (4, 2, 100.0, 100.0),
    ]


def test_a_bad_evaluation_folder_is_refused_before_the_first_step(tmp_path, colours, capsys, monkeypatch):
    """Exit 2 naming the key, before any model is built (no log file); a half-set pair is a config error."""
    from helpers import ROOT

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr("mae_fast.train.model_from_config", no_model)
    train_dir, val_dir = colours
    base = ["train", str(ROOT / "configs/demo.yaml")]
    for o in ("data.backend=synthetic", "data.synthetic_images=64", f"logging.output_dir={tmp_path}/out"):
        base += ["--set", o]
    cases = [
        ([f"evaluation.train_path={tmp_path}/nope"], f"evaluation.train_path: dataset path does not exist: {tmp_path}"),
        ([f"evaluation.val_path={tmp_path}/nope"], f"evaluation.val_path: dataset path does not exist: {tmp_path}"),
        (
            [f"evaluation.val_path={train_dir}/red"],
            "evaluation.val_path: " + f"{train_dir}/red has no class subfolders",
        ),
        (["evaluation.train_path="], "evaluation.train_path: is empty but evaluation.val_path is"),
    ]
    for change, message in cases:
        paths = [f"evaluation.train_path={train_dir}", f"evaluation.val_path={val_dir}", *change]
        assert main([*base, *[a for p in paths for a in ("--set", p)]]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not list((tmp_path / "out").glob("*.log"))


def test_the_demo_writes_its_labelled_sample_only_where_it_is_missing(tmp_path, monkeypatch):
    import mae_fast.pipelines.sample_data as sample_data
    from mae_fast.evaluate import sample_labelled_if_missing

    written = []
    monkeypatch.setattr(sample_data, "make_labelled_sample", lambda out, **kw: written.append((out, kw)))
    assert sample_labelled_if_missing(f"{tmp_path}/s/train", f"{tmp_path}/s/val")
    assert written == [(f"{tmp_path}/s", sample_data.DEMO_LABELLED)]
    (tmp_path / "t/val").mkdir(parents=True)
    assert not sample_labelled_if_missing(f"{tmp_path}/t/train", f"{tmp_path}/t/val")  # one of them exists
    assert not sample_labelled_if_missing(f"{tmp_path}/a/train", f"{tmp_path}/b/val")  # not one DIR/train, DIR/val
    assert not sample_labelled_if_missing(f"{tmp_path}/u/tr", f"{tmp_path}/u/val")
    assert len(written) == 1


def test_labelled_sample_of_regions(tmp_path):
    pytest.importorskip("skimage")
    from mae_fast.pipelines.sample_data import make_labelled_sample

    out = make_labelled_sample(str(tmp_path / "s"), n_train=48, n_val=24, seed=0, regions=2)
    sets = scan_labelled(f"{out}/train", f"{out}/val")
    assert len(sets.classes) == 24 and {"astronaut_00", "astronaut_11", "rocket_10"} <= set(sets.classes)
    assert sorted(sets.train_labels) == sorted(list(range(24)) * 2) and sorted(sets.val_labels) == list(range(24))
    assert {Image.open(f).width for f in sets.val_files} == {200}


def test_evaluation_config_and_dashboard():
    from rich.console import Console

    from mae_fast.dashboard import RunInfo, render
    from mae_fast.metrics import Snapshot

    e = config_from_dict({}).evaluation
    assert (e.enabled, e.freq_epochs, e.max_train_images, e.k, e.linear_probe, e.batch_size) == (
        False, 10, 10000, 20, False, 128,
    )  # fmt: skip
    for bad, message in [
        ("evaluation.k=0", "evaluation.k: must be at least 1"),
        ("evaluation.freq_epochs=-1", "evaluation.freq_epochs: must be >= 0"),
        ("evaluation.max_train_images=-5", "evaluation.max_train_images: must be >= 0"),
        ("evaluation.batch_size=0", "evaluation.batch_size: must be positive"),
        ("evaluation.val_path=v", "evaluation.train_path: is empty but evaluation.val_path is 'v'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({}, [bad])
    on = config_from_dict({"evaluation": {"train_path": "t", "val_path": "v"}})
    assert on.evaluation.enabled and not config_from_dict(on.to_dict(), ["evaluation=null"]).evaluation.enabled
    snap = Snapshot(30, 2, 10, 10, 100, 0.6, 0.6, 0.6, 1e-3, 0.5, 100.0, 10.0, 0.0, 1.0, 10.0, 0.0, 0.0, 5.0)
    console = Console(record=True, width=120)
    console.print(render(snap, RunInfo("r", "m", "cpu", ""), evals=[(10, 46.2), (20, 51.2), (30, 52.5)]))
    text = console.export_text()
    assert "kNN" in text and "top-1 52.5 % at epoch 30, +6.3 from epoch 10" in text and "(before: 46.2 51.2)" in text


def test_a_failed_evaluation_is_a_warning_and_training_goes_on(tmp_path, colours, monkeypatch):
    from mae_fast.train import train

    calls = []

    def fails(*a, **k):
        calls.append(1)
        raise RuntimeError("feature extraction failed: rank 0: DALI failed (out of memory)")

    monkeypatch.setattr(Evaluator, "__call__", fails)
    lines = []
    result = train(eval_run(tmp_path, colours), log=lines.append)
    assert result.steps_done == 15 and (tmp_path / "ckpt/final.pt").exists() and len(calls) == 1
    warning = next(x for x in lines if x.startswith("WARNING: evaluation at epoch 0 failed"))
    assert "out of memory" in warning and "training goes on without evaluation" in warning
    assert result.evaluations == [] and records(tmp_path / "out")[1] == []


def test_with_init_weights_epoch_0_scores_the_loaded_encoder(tmp_path, colours, monkeypatch):
    """misc.init_weights: the baseline is the loaded encoder (how a user sees whether continued pretraining
    helps), scored before the first step; metrics.jsonl has its epoch-0 record."""
    from mae_fast.train import train

    torch.manual_seed(5)  # weights unlike the run's own seed-0 initialization
    init = build_model("mae_vit_tiny_patch8", img_size=32)
    torch.save({"model": init.state_dict()}, tmp_path / "init.pth")  # an official-style full checkpoint
    seen, real = [], Evaluator.__call__

    def record(self, model, step, epoch):
        seen.append((epoch, {k: v.clone() for k, v in model.state_dict().items()}))
        return real(self, model, step, epoch)

    monkeypatch.setattr(Evaluator, "__call__", record)
    cfg = eval_run(tmp_path, colours, f"misc.init_weights={tmp_path}/init.pth", "schedule.epochs=1")
    result = train(cfg, log=lambda line: None)
    assert [e for e, _ in seen] == [0, 1] and [(e.step, e.epoch) for e in result.evaluations] == [(0, 0), (3, 1)]
    assert all(torch.equal(seen[0][1][k], v) for k, v in init.state_dict().items())
    assert not torch.equal(seen[1][1]["norm.weight"], init.state_dict()["norm.weight"])  # trained after it
    assert [(e["step"], e["epoch"]) for e in records(tmp_path / "out")[1]] == [(0, 0), (3, 1)]


def test_an_undecodable_eval_image_in_training_is_a_warning_and_left_out(tmp_path, colours):
    """Named once (at the baseline), counted in that record, left out of the later ones; training goes on."""
    from mae_fast.train import train

    train_dir, val_dir = colours
    broken = f"{val_dir}/red/zz_broken.jpg"
    broken_huffman_copy(f"{val_dir}/red/red_0.jpg", broken)
    lines = []
    result = train(eval_run(tmp_path, colours, "schedule.epochs=2"), log=lines.append)
    assert result.steps_done == 6 and [e.epoch for e in result.evaluations] == [0, 2]
    warnings = [x for x in lines if x.startswith("WARNING: evaluation:")]
    assert warnings == [f"WARNING: evaluation: {broken} cannot be decoded; left out of this and later evaluations"]
    assert result.evaluations[0].skipped == (broken,) and result.evaluations[1].skipped == ()
    assert [e.num_val for e in result.evaluations] == [16, 16] and result.evaluations[1].knn_top1 == 100.0
    evals = records(tmp_path / "out")[1]
    assert evals[0]["skipped"] == 1 and "skipped" not in evals[1]
    assert any(x.startswith("eval epoch 0:") and "1 undecodable file(s) left out" in x for x in lines)
