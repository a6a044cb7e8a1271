"""Masked Autoencoder (He et al. 2021) on timm's ViT blocks.

Semantics, initialization and parameter names follow facebookresearch/mae
models_mae.py, so an official checkpoint's state dict loads with strict=True
and gives the official loss for the same masking noise. Differences are only
in how the same numbers are computed:

- the masking noise can be passed in (`noise=`) so tests and parity checks can
  fix it;
- the number of kept patches is a Python int fixed by (L, mask_ratio), so every
  shape is static and torch.compile builds one graph;
- attention="flash" | "efficient" | "cudnn" | "math" pins the scaled-dot-product
  attention kernel of every block (also when a checkpointed block is recomputed);
- the pixels are cast to the weights' dtype where they enter the patch embedding
  (a no-op for fp32 weights), so a bf16 copy of the model runs without autocast;
  the loss target is always computed from the fp32 pixels;
- with embed_kept_only=True the patch embedding (a per-patch linear map) runs on
  the kept patches only, after the masking, instead of on all of them before it:
  the same numbers up to rounding, for a quarter of the patch-embedding work.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .presets import PRESETS, MAEArch, arch_for  # noqa: F401 (re-exported: the model's names)


def sdpa_backends(attention: str) -> list | None:
    """misc.attention ("auto", "flash", "efficient", "cudnn", "math") -> the SDPA kernels to allow (None for
    auto: PyTorch chooses)."""
    from torch.nn.attention import SDPBackend

    kernels = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return None if attention == "auto" else [kernels[attention]]


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, (grid*grid [+1], dim), as MAE's util/pos_embed.py.

    Half the channels encode the column (w) coordinate, half the row (h); the cls slot is zeros.
    """
    assert dim % 4 == 0, "sin-cos embedding needs dim divisible by 4"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # (D/4,)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def encode(pos: np.ndarray) -> np.ndarray:  # (M,) -> (M, D/2)
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([encode(gw), encode(gh)], axis=1)  # (grid*grid, D)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder and a lightweight ViT decoder.

    forward(imgs (N,3,H,W), mask_ratio, noise (N,L) or None) -> (loss, pred (N,L,p*p*3), mask (N,L))
    """

    def __init__(
        self,
        arch: MAEArch = PRESETS["mae_vit_base_patch16"],
        norm_pix_loss: bool = False,
        grad_checkpointing: bool = False,
        embed_kept_only: bool = False,
        attention: str = "auto",
    ):
        super().__init__()
        self.arch = arch
        self.sdpa_backends = sdpa_backends(attention)
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = grad_checkpointing
        self.embed_kept_only = embed_kept_only
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        D, Dd = arch.embed_dim, arch.decoder_embed_dim

        # encoder
        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, 3, D)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, D), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList(
            [Block(D, arch.num_heads, arch.mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(arch.depth)]
        )
        self.norm = norm_layer(D)

        # decoder
        self.decoder_embed = nn.Linear(D, Dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(Dd, arch.decoder_num_heads, arch.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(arch.decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(Dd)
        self.decoder_pred = nn.Linear(Dd, arch.patch_size**2 * 3, bias=True)

        self.initialize_weights()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def initialize_weights(self) -> None:
        grid = self.arch.img_size // self.arch.patch_size
        self.pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid, cls_token=True)).float().unsqueeze(0)
        )
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True))
            .float()
            .unsqueeze(0)
        )
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch embed as a Linear
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- patches -------------------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3), channel last inside a patch, as the official code."""
        p = self.arch.patch_size
        N, C, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(N, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(N, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*3) -> (N, 3, H, W)."""
        p = self.arch.patch_size
        N, L, _ = x.shape
        h = w = int(L**0.5)
        x = x.reshape(N, h, w, p, p, 3)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(N, 3, h * p, w * p)

    def masking_indices(self, N: int, mask_ratio: float, noise: torch.Tensor | None, device: torch.device):
        """Which patches each image keeps: the int(L*(1-mask_ratio)) with the smallest noise.

        -> ids_keep (N, L_keep), mask (N, L) with 1 = removed, ids_restore (N, L).
        """
        L = self.num_patches
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(N, L, device=device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_shuffle[:, :len_keep], mask, ids_restore

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """x: (N, L, D) -> x_kept (N, L_keep, D), mask (N, L) with 1 = removed, ids_restore (N, L)."""
        ids_keep, mask, ids_restore = self.masking_indices(x.shape[0], mask_ratio, noise, x.device)
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return x_kept, mask, ids_restore

    def embed_patches(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Patch embedding + position of the kept patches only: (N, 3, H, W), (N, L_keep) -> (N, L_keep, D).

        The stride-p convolution of PatchEmbed is a linear map of each patch's pixels in (c, p, q) order.
        """
        p = self.arch.patch_size
        N, C, H, W = imgs.shape
        patches = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(N, -1, C * p * p)
        patches = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[2]))
        proj = self.patch_embed.proj
        x = F.linear(patches.to(proj.weight.dtype), proj.weight.flatten(1), proj.bias)
        pos = self.pos_embed[0, 1:, :][ids_keep]  # (N, L_keep, D)
        return x + pos

    # -- encoder / decoder ---------------------------------------------------------------------

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block, under the pinned attention kernel if any (traced by Dynamo; re-entered on recompute)."""
        if self.sdpa_backends is None:
            return blk(x)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.sdpa_backends):
            return blk(x)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(self._block, blk, x, use_reentrant=False)
            else:
                x = self._block(blk, x)
        return x

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        if self.embed_kept_only:
            ids_keep, mask, ids_restore = self.masking_indices(imgs.shape[0], mask_ratio, noise, imgs.device)
            x = self.embed_patches(imgs, ids_keep)  # (N, L_keep, D)
        else:  # the official order: embed all patches, then drop the masked ones
            x = self.patch_embed(imgs.to(self.patch_embed.proj.weight.dtype)) + self.pos_embed[:, 1:, :]  # (N, L, D)
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (N, L_keep, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + L_keep, D)
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on all patches, no masking (inference, export): (N, 1 + L, D) after the final norm."""
        x = self.patch_embed(imgs.to(self.patch_embed.proj.weight.dtype)) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self._run_blocks(self.blocks, torch.cat([cls, x], dim=1))
        return self.norm(x)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # (N, 1 + L_keep, Dd)
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # (N, L, p*p*3), drop cls

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only (in fp32)."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred.float() - target).pow(2).mean(dim=-1)  # (N, L)
        mask = mask.float()
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def build_model(
    model_type: str,
    norm_pix_loss: bool = False,
    img_size: int | None = None,
    grad_checkpointing: bool = False,
    embed_kept_only: bool = False,
    attention: str = "auto",
) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        arch_for(model_type, img_size),
        norm_pix_loss=norm_pix_loss,
        grad_checkpointing=grad_checkpointing,
        embed_kept_only=embed_kept_only,
        attention=attention,
    )


def model_flops_per_image(arch: MAEArch, mask_ratio: float) -> float:
    """Matmul FLOPs of forward + backward for one image (3x forward; 2 FLOPs per MAC).

    Counts the linear layers, attention scores and the patch embedding; ignores norms/softmax.
    """
    L = (arch.img_size // arch.patch_size) ** 2
    keep = int(L * (1 - mask_ratio))

    def blocks(tokens: int, dim: int, depth: int) -> float:
        linear = tokens * (4 * dim * dim + 2 * dim * int(dim * arch.mlp_ratio))  # qkv+proj, mlp
        attn = 2 * tokens * tokens * dim  # q@k^T and attn@v
        return depth * (linear + attn)

    D, Dd, p2c = arch.embed_dim, arch.decoder_embed_dim, arch.patch_size**2 * 3
    macs = (
        L * p2c * D  # patch embed (conv over all patches)
        + blocks(keep + 1, D, arch.depth)
        + (keep + 1) * D * Dd  # decoder_embed
        + blocks(L + 1, Dd, arch.decoder_depth)
        + (L + 1) * Dd * p2c
    )  # decoder_pred
    return 3 * 2 * macs
