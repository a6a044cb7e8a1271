"""The MAE architectures by name (no torch here: the config checks model.type against this table)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MAEArch:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0


# The official presets (models_mae.py: mae_vit_*_dec512d8b) and a tiny one for tests.
PRESETS: dict[str, MAEArch] = {
    "mae_vit_base_patch16": MAEArch(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large_patch16": MAEArch(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": MAEArch(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "mae_vit_tiny_patch8": MAEArch(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=4,
    ),
}


def arch_for(model_type: str, img_size: int | None = None) -> MAEArch:
    """The preset's architecture, at another input size if given."""
    if model_type not in PRESETS:
        raise ValueError(f"unknown model.type {model_type!r}; choose one of {sorted(PRESETS)}")
    arch = PRESETS[model_type]
    return arch if img_size is None else replace(arch, img_size=img_size)
