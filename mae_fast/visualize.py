"""Reconstruction grids, as the official demo: original | masked | reconstruction | reconstruction
with the visible patches pasted back. With norm_pix_loss the prediction is un-normalized with the
statistics of the original's own patches, so it shows an image, not noise."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write
from .model import MaskedAutoencoderViT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | Path | bytes, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic), centre-crop, normalize -> (3, size, size).
    `path`: an image file, or an encoded image's bytes (a shard sample)."""
    try:
        img = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path).convert("RGB")
    except (OSError, ValueError) as e:
        what = f"({len(path)} bytes)" if isinstance(path, bytes) else path
        raise ValueError(f"cannot read image {what}: {e}") from None
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def unnormalize_pred(model: MaskedAutoencoderViT, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Predicted patches (N, L, p*p*3) in the image's (normalized) pixel space: with norm_pix_loss, each patch
    gets back the mean and std of the same patch of the original."""
    if not model.norm_pix_loss:
        return pred
    target = model.patchify(imgs)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6) ** 0.5 + mean


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0
) -> list[torch.Tensor]:
    """imgs (N, 3, H, W), normalized -> [original, masked, reconstruction, pasted], each (N, 3, H, W)."""
    was_training = model.training
    model.eval()
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=torch.Generator().manual_seed(seed))
    _, pred, mask = model(imgs, mask_ratio, noise.to(imgs.device))
    model.train(was_training)
    recon = model.unpatchify(unnormalize_pred(model, imgs, pred.float()))
    p2c = pred.shape[-1]
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p2c).float())  # 1 where removed
    return [imgs, imgs * (1 - removed), recon, imgs * (1 - removed) + recon * removed]


def to_uint8(img: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(3, H, W) normalized -> (H, W, 3) uint8."""
    x = img.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def save_grid(panels: list[torch.Tensor], path: str | Path, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:
    """One row per image, one column per panel -> PNG of (N*H, len(panels)*W)."""
    rows = [np.concatenate([to_uint8(p[i], mean, std) for p in panels], axis=1) for i in range(panels[0].shape[0])]
    path = Path(path)
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    atomic_write(path, lambda f: grid.save(f, format="PNG"))  # never a partial PNG (a full disk: CheckpointError)
    return path


def visualize_files(
    model: MaskedAutoencoderViT,
    files: list[str | bytes],
    out: str | Path,
    mask_ratio: float = 0.75,
    seed: int = 0,
    device: torch.device | str = "cpu",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> Path:
    """The grid for image files (or encoded images' bytes), normalized with the model's training mean/std."""
    imgs = torch.stack([load_image(f, model.arch.img_size, mean, std) for f in files]).to(device)
    return save_grid(reconstruct(model, imgs, mask_ratio, seed), out, mean, std)
