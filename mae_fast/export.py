"""Export the pretrained encoder: timm weights (safetensors) for fine-tuning, or a TorchScript /
torch.export program for inference. Every export is checked against the eager encoder before it
is written."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, check_finite
from .model import MAEArch, MaskedAutoencoderViT

# mae-fast preset -> the timm model with the same encoder
TIMM_NAMES = {
    "mae_vit_base_patch16": "vit_base_patch16_224",
    "mae_vit_large_patch16": "vit_large_patch16_224",
    "mae_vit_huge_patch14": "vit_huge_patch14_224",
}


class Encoder(nn.Module):
    """Images (N, 3, H, W), ImageNet-normalized -> features (N, D): the cls token after the final norm,
    as timm's VisionTransformer with num_classes=0 returns it."""

    def __init__(self, mae: MaskedAutoencoderViT):
        super().__init__()
        self.mae = mae

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.mae.forward_features(imgs)[:, 0]


def ensure_finite(mae: MaskedAutoencoderViT, source: str) -> None:
    """CheckpointError if a weight of `mae` (read from `source`) is NaN or inf: such an export would only
    give NaN features (training never saves such weights; a file damaged or written elsewhere may hold them)."""
    if bad := check_finite(mae):
        raise CheckpointError(
            f"{source}: the weights are not finite ({len(bad)} tensors hold NaN or inf: {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); nothing exported"
        )


def encoder_state_dict(mae: MaskedAutoencoderViT) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's VisionTransformer names (which MAE's already are)."""
    return {
        k: v.detach().contiguous().clone()
        for k, v in mae.state_dict().items()
        if not k.startswith("decoder_") and k != "mask_token"
    }


def timm_name(model_type: str) -> str:
    return TIMM_NAMES.get(model_type, "vit_base_patch16_224")


def timm_kwargs(arch: MAEArch) -> dict:
    """Architecture arguments that make timm's model match this encoder (needed for non-standard presets)."""
    return {
        "img_size": arch.img_size,
        "patch_size": arch.patch_size,
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
        "mlp_ratio": arch.mlp_ratio,
    }


def _check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-4) -> None:
    err = (got - want).abs().max().item()
    if not torch.allclose(got, want, atol=atol, rtol=1e-4):
        raise RuntimeError(f"{name} export differs from the eager encoder (max abs error {err:.2e}); not written")


def export_timm(mae: MaskedAutoencoderViT, model_type: str, out: str | Path) -> str:
    """Write safetensors loadable by timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": out,
    "num_classes": 0}, num_classes=N): the file has no classifier, and saying so in the overlay makes timm give the
    model a fresh N-class head for fine-tuning (N=0: features only) instead of looking for one in the file. Loads it
    back in timm and compares features before returning the load instructions."""
    import timm
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(encoder_state_dict(mae), str(out), metadata={"format": "pt", "source": f"mae-fast {model_type}"})
    name = timm_name(model_type)
    # a standard preset at 224 px is timm's model as named; anything else names its architecture
    standard = model_type in TIMM_NAMES and mae.arch.img_size == 224
    extra = {} if standard else timm_kwargs(mae.arch)
    try:
        loaded = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(out), "num_classes": 0}, num_classes=0, **extra
        ).eval()
        x = torch.randn(2, 3, mae.arch.img_size, mae.arch.img_size)
        with torch.no_grad():
            _check("timm", loaded.forward_features(x), mae.eval().forward_features(x))
    except Exception:
        out.unlink(missing_ok=True)
        raise
    args = "".join(f", {k}={v!r}" for k, v in extra.items())
    return (
        f'timm.create_model("{name}", pretrained=True, pretrained_cfg_overlay={{"file": "{out}", "num_classes": 0}}, '
        f"num_classes=0{args})  # num_classes=1000: a fresh head for fine-tuning"
    )


def export_torchscript(mae: MaskedAutoencoderViT, out: str | Path) -> None:
    enc = Encoder(mae).eval()
    size = mae.arch.img_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # timm's input-size assert, fixed by design
        traced = torch.jit.trace(enc, torch.randn(1, 3, size, size))
        x = torch.randn(3, 3, size, size)  # another batch size than traced with
        _check("TorchScript", traced(x), enc(x))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(out))


def export_program(mae: MaskedAutoencoderViT, out: str | Path) -> None:
    """torch.export with a dynamic batch dimension; saved with torch.export.save (.pt2)."""
    enc = Encoder(mae).eval()
    size = mae.arch.img_size
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(enc, (torch.randn(2, 3, size, size),), dynamic_shapes=({0: batch},))
        x = torch.randn(3, 3, size, size)
        _check("torch.export", program.module()(x), enc(x))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out))
