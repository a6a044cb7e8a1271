"""Build an MAE from any checkpoint: mae-fast's own, or facebookresearch/mae's (the full
"visualize" ones with a decoder, and the encoder-only pretrain ones), read safely by
checkpoint.load_checkpoint (weights_only=True); load_encoder also takes a timm export (safetensors).
Each file is read once: the weights, their format, the step and the normalization come back together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .model import PRESETS, MAEArch, MaskedAutoencoderViT
from .pipelines.common import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class LoadedWeights:
    model: MaskedAutoencoderViT
    model_type: str  # the preset name
    source: str  # "mae-fast" | "official" | "official-encoder" | "timm-export"
    notes: list[str]
    config: dict | None  # mae-fast's resolved config, when the file has one
    step: int | None = None  # optimizer steps done, for a mae-fast checkpoint

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the weights were trained with: a mae-fast config's, else ImageNet's."""
        aug = ((self.config or {}).get("data") or {}).get("augmentation") or {}
        if aug.get("mean") and aug.get("std"):
            return tuple(float(x) for x in aug["mean"]), tuple(float(x) for x in aug["std"])
        return IMAGENET_MEAN, IMAGENET_STD


def infer_arch(sd: dict[str, torch.Tensor], path: str) -> tuple[str, MAEArch]:
    """Which preset these weights are, from their shapes; image size from the position embedding."""
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        keys = ", ".join(list(sd)[:5])
        raise CheckpointError(
            f"{path} holds no MAE/ViT weights (no patch_embed.proj.weight / pos_embed; keys start with {keys})"
        )
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    for name, arch in PRESETS.items():
        if (arch.patch_size, arch.embed_dim, arch.depth) == (patch, dim, depth):
            if "decoder_embed.weight" in sd and sd["decoder_embed.weight"].shape[0] != arch.decoder_embed_dim:
                continue
            return name, MAEArch(**{**arch.__dict__, "img_size": grid * patch})
    raise CheckpointError(
        f"{path}: weights of a ViT with patch {patch}, width {dim}, depth {depth} match no "
        f"mae-fast preset ({', '.join(PRESETS)})"
    )


def load_mae(path: str | Path, norm_pix_loss: bool | None = None) -> LoadedWeights:
    """An MAE with the checkpoint's weights. An encoder-only file gets a fresh decoder (noted)."""
    obj = load_checkpoint(path)
    sd = obj.get("model", obj)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors under 'model'")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    name, arch = infer_arch(sd, str(path))
    config = obj.get("config") if obj.get("format") == "mae-fast" else None
    step = obj.get("step") if config and isinstance(obj.get("step"), int) else None
    if norm_pix_loss is None:
        norm_pix_loss = bool(config["model"]["norm_pix_loss"]) if config else False
    model = MaskedAutoencoderViT(arch, norm_pix_loss=norm_pix_loss)
    notes = []
    has_decoder = any(k.startswith("decoder_") for k in sd)
    if has_decoder:
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:  # a missing or extra key, a tensor of another shape
            problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            raise CheckpointError(f"{path}: the weights do not fit {name}: {'; '.join(problems)[:400]}") from None
        source = "mae-fast" if config else "official"
    else:
        # the official pretrain checkpoints hold the encoder only (plus no mask token)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            raise CheckpointError(f"{path}: the weights do not fit {name}: {'; '.join(problems)[:400]}") from None
        if unexpected or any(not (k.startswith("decoder_") or k == "mask_token") for k in missing):
            raise CheckpointError(
                f"{path}: encoder weights do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        source = "official-encoder"
        notes.append(f"{path} holds the encoder only: the decoder and mask token are freshly initialized")
    notes.insert(0, f"{path}: {source} checkpoint of {name} ({arch.img_size}px)")
    return LoadedWeights(model, name, source, notes, config, step)


def is_safetensors(path: Path) -> bool:
    """A .safetensors name, or the format's start: an 8-byte little-endian header length, then a JSON header."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def load_timm_export(path: str | Path) -> LoadedWeights:
    """An MAE whose encoder holds the weights of `mae-fast export --format timm` (a timm VisionTransformer's
    state dict; a classifier head, if any, is ignored). The decoder is freshly initialized."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    name, arch = infer_arch(sd, str(path))
    model = MaskedAutoencoderViT(arch)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise CheckpointError(f"{path}: timm weights do not fit {name}: {str(e)[:400]}") from None
    if unexpected or any(not (k.startswith("decoder_") or k == "mask_token") for k in missing):
        raise CheckpointError(
            f"{path}: timm weights do not fit an MAE encoder: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return LoadedWeights(model, name, "timm-export", [f"{path}: timm export of {name} ({arch.img_size}px)"], None)


def load_encoder(path: str | Path) -> LoadedWeights:
    """The encoder of a mae-fast checkpoint, an official MAE checkpoint (full or encoder-only) or a timm export."""
    path = Path(path)
    if path.is_file() and is_safetensors(path):
        return load_timm_export(path)
    return load_mae(path)
