"""Using what was pretrained: reconstructions, timm / TorchScript / torch.export encoders, official checkpoints."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.checkpoint import CheckpointError
from mae_fast.cli import main
from mae_fast.config import config_from_dict
from mae_fast.export import Encoder, encoder_state_dict, timm_kwargs
from mae_fast.model import build_model
from mae_fast.visualize import reconstruct, unnormalize_pred
from mae_fast.weights import load_mae

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(tmp_path):
    """A mae-fast checkpoint of the tiny preset (norm_pix_loss on), as the train loop writes it."""
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch8", norm_pix_loss=True)
    cfg = config_from_dict(
        {"model": {"type": "mae_vit_tiny_patch8", "norm_pix_loss": True}, "data": {"input_size": 32}}
    )
    path = tmp_path / "final.pt"
    torch.save({"format": "mae-fast", "model": model.state_dict(), "config": cfg.to_dict(), "step": 10}, path)
    return model, path


def photo(tmp_path, name="a.jpg", size=(50, 40)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name)
    return str(tmp_path / name)


def test_visualize_writes_a_png_of_the_expected_size(tmp_path, trained, capsys):
    _, ckpt = trained
    images = [photo(tmp_path, "a.jpg"), photo(tmp_path, "b.png", (30, 60))]
    out = tmp_path / "recon.png"
    assert main(["visualize", str(ckpt), "--images", *images, "--out", str(out), "--seed", "3"]) == 0
    assert Image.open(out).size == (4 * 32, 2 * 32)  # 4 panels wide, one row per image
    assert "mae-fast checkpoint of mae_vit_tiny_patch8 (32px)" in capsys.readouterr().out
    # the same seed draws the same mask: the same picture
    out2 = tmp_path / "recon2.png"
    main(["visualize", str(ckpt), "--images", *images, "--out", str(out2), "--seed", "3"])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(out2)))


def test_reconstruction_panels(trained):
    model, _ = trained
    imgs = torch.randn(2, 3, 32, 32)
    original, masked, recon, pasted = reconstruct(model, imgs, mask_ratio=0.75, seed=1)
    assert torch.equal(original, imgs)
    removed = (masked == 0).all(dim=0).float()  # removed patches are blanked
    kept_pixels = masked != 0
    assert torch.equal(pasted[kept_pixels], imgs[kept_pixels])  # visible patches pasted back as they were
    assert 0.7 < (masked == 0).float().mean() < 0.8  # 12 of 16 patches removed
    assert recon.shape == imgs.shape and removed.shape == (3, 32, 32)


def test_unnormalization_restores_the_patch_statistics(trained):
    model, _ = trained
    imgs = torch.rand(2, 3, 32, 32) * 3 - 1
    target = model.patchify(imgs)
    normalized = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    restored = unnormalize_pred(model, imgs, normalized)  # a perfect norm_pix prediction ...
    assert torch.allclose(restored, target, atol=1e-4)  # ... becomes the original's patches
    assert torch.allclose(restored.mean(-1), target.mean(-1), atol=1e-5)
    assert torch.allclose(restored.std(-1), target.std(-1), atol=1e-4)


def test_timm_export_loads_strictly_and_matches(tmp_path, trained):
    import timm
    from safetensors.torch import load_file

    model, ckpt = trained
    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(out)]) == 0
    # strict keys: exactly a timm VisionTransformer's (num_classes=0), and timm's own loader accepts the file
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **timm_kwargs(model.arch))
    vit.load_state_dict(load_file(str(out)), strict=True)
    loaded = timm.create_model(
        "vit_base_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out), "num_classes": 0},
        num_classes=0,
        **timm_kwargs(model.arch),
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), Encoder(model)(x), atol=1e-5)
        assert torch.allclose(loaded.forward_features(x), model.forward_features(x), atol=1e-5)
    assert set(encoder_state_dict(model)) == set(vit.state_dict())
    # fine-tuning with a new head: the overlay says the file has no classifier, timm adds a fresh one
    tuned = timm.create_model(
        "vit_base_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out), "num_classes": 0},
        num_classes=10,
        **timm_kwargs(model.arch),
    )
    assert tuned.head.out_features == 10
    for name, value in load_file(str(out)).items():
        assert torch.equal(tuned.state_dict()[name], value), name
    with pytest.raises(RuntimeError, match="head.weight"):  # without it timm looks for a 1000-class head in the file
        timm.create_model(
            "vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay={"file": str(out)}, num_classes=1000,
            **timm_kwargs(model.arch),
        )  # fmt: skip


def test_export_to_an_unwritable_path_is_one_error_line(tmp_path, trained, capsys):
    from mae_fast.cli import EXIT_USAGE

    _, ckpt = trained
    (tmp_path / "a-file").write_text("")
    for fmt in ("timm", "torchscript"):
        assert (
            main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / "a-file/enc.out")]) == EXIT_USAGE
        )  # a bad argument, found before the model is built
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {tmp_path}/a-file/enc.out: cannot write") and "Traceback" not in err


def test_standard_presets_map_to_timm_models():
    import timm

    with torch.device("meta"):
        model = build_model("mae_vit_large_patch16")
        vit = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)
    enc = encoder_state_dict(model)
    assert set(enc) == set(vit.state_dict())
    assert all(enc[k].shape == v.shape for k, v in vit.state_dict().items())


@pytest.mark.parametrize("fmt,suffix", [("torchscript", "ts.pt"), ("exported", "pt2")])
def test_inference_exports_match_eager(tmp_path, trained, fmt, suffix):
    model, ckpt = trained
    out = tmp_path / f"encoder.{suffix}"
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    prog = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(prog(x), Encoder(model.eval())(x), atol=1e-5)


def official_state_dict(model):
    """A facebookresearch/mae checkpoint, written in the test with the official key names and layout."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_official_checkpoints_load(tmp_path, capsys):
    torch.manual_seed(1)
    model = build_model("mae_vit_tiny_patch8")
    full = {
        "model": official_state_dict(model),
        "optimizer": {},
        "epoch": 799,
        "args": argparse.Namespace(model="mae_vit_tiny_patch8", norm_pix_loss=False, blr=1.5e-4),
    }
    torch.save(full, tmp_path / "checkpoint-799.pth")
    loaded = load_mae(tmp_path / "checkpoint-799.pth")
    assert loaded.source == "official" and loaded.model_type == "mae_vit_tiny_patch8"
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(imgs, 0.75, noise)[0], model(imgs, 0.75, noise)[0])
    # encoder only (as mae_pretrain_vit_base.pth): a fresh decoder, and a message saying so
    enc = {k: v for k, v in official_state_dict(model).items() if not k.startswith("decoder_") and k != "mask_token"}
    torch.save({"model": enc}, tmp_path / "mae_pretrain.pth")
    loaded = load_mae(tmp_path / "mae_pretrain.pth")
    assert loaded.source == "official-encoder" and "decoder and mask token are freshly initialized" in loaded.notes[1]
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    # and visualize / export take them
    img = photo(tmp_path)
    assert (
        main(["visualize", str(tmp_path / "checkpoint-799.pth"), "--images", img, "--out", str(tmp_path / "r.png")])
        == 0
    )
    assert main(["export", str(tmp_path / "mae_pretrain.pth"), "--out", str(tmp_path / "e.safetensors")]) == 0


def test_official_weights_as_init_and_refused_as_resume(tmp_path):
    from mae_fast.train import train

    torch.manual_seed(2)
    model = build_model("mae_vit_tiny_patch8", img_size=64)
    enc = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder_") and k != "mask_token"}
    torch.save({"model": enc, "args": argparse.Namespace(epochs=800)}, tmp_path / "official.pth")
    base = [
        f"logging.output_dir={tmp_path}/out",
        f"checkpointing.checkpoint_dir={tmp_path}/ck",
        "evaluation=null",
        "data.backend=synthetic",
        "data.synthetic_images=64",
        "misc.compile=false",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
    ]
    from mae_fast.config import load_config

    lines = []
    train(
        load_config(ROOT / "configs/demo.yaml", base + [f"misc.init_weights={tmp_path}/official.pth"]),
        log=lines.append,
        max_steps=1,
    )
    assert any("init weights:" in x and "encoder only" in x for x in lines)
    with pytest.raises(CheckpointError, match="not a mae-fast training checkpoint.*misc.init_weights"):
        train(
            load_config(ROOT / "configs/demo.yaml", base + [f"misc.resume={tmp_path}/official.pth"]), log=lines.append
        )


def test_error_cases(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_mae(tmp_path / "notes.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_mae(tmp_path / "missing.pt")
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="holds no MAE/ViT weights"):
        load_mae(tmp_path / "other.pt")
    import timm

    vit = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=3,
        num_heads=3,
    )
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match="patch 8, width 48, depth 3 match no mae-fast preset"):
        load_mae(tmp_path / "vit.pt")
    # the CLI turns these into a message and exit code 1
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path, capsys):
    """A checkpoint that loads but has a tensor of another shape, or a missing key: one error line, exit 1."""
    from mae_fast.cli import EXIT_ERROR, main

    sd = build_model("mae_vit_tiny_patch8").state_dict()
    bad_shape = {**sd, "decoder_pred.weight": torch.zeros(5, 32)}
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}
    for name, state in (("shape.pt", bad_shape), ("missing.pt", missing)):
        torch.save({"model": state}, tmp_path / name)
        for command in (["visualize", str(tmp_path / name), "--images", "x.jpg"],
                        ["export", str(tmp_path / name), "--out", str(tmp_path / "e.safetensors")]):  # fmt: skip
            assert main(command) == EXIT_ERROR
            err = capsys.readouterr().err
            assert err.startswith(f"error: {tmp_path / name}: the weights do not fit mae_vit_tiny_patch8") and (
                "decoder_pred.weight" in err or "blocks.1.mlp.fc2.weight" in err
            ), err
