"""Build an MAE from any checkpoint: mae-fast's own, or facebookresearch/mae's (the full
"visualize" ones with a decoder, and the encoder-only pretrain ones), read safely by
checkpoint.load_checkpoint (weights_only=True)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .model import PRESETS, MAEArch, MaskedAutoencoderViT


@dataclass
class LoadedWeights:
    model: MaskedAutoencoderViT
    model_type: str  # the preset name
    source: str  # "mae-fast" | "official" | "official-encoder"
    notes: list[str]
    config: dict | None  # mae-fast's resolved config, when the file has one


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
    return LoadedWeights(model, name, source, notes, config)
