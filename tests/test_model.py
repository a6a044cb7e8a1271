import pytest
import torch

from mae_fast.model import PRESETS, MaskedAutoencoderViT, build_model, sincos_pos_embed_2d


def test_patchify_unpatchify_round_trip(tiny_model):
    imgs = torch.randn(3, 3, 32, 32)
    patches = tiny_model.patchify(imgs)
    assert patches.shape == (3, 16, 8 * 8 * 3)
    assert torch.equal(tiny_model.unpatchify(patches), imgs)
    # patch 0 is the top-left 8x8 block, channels last inside the patch
    assert torch.equal(patches[0, 0].view(8, 8, 3), imgs[0, :, :8, :8].permute(1, 2, 0))
    assert torch.equal(patches[0, 1].view(8, 8, 3), imgs[0, :, :8, 8:16].permute(1, 2, 0))


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_masking_invariants(tiny_model, ratio):
    N, L, D = 4, 16, 5
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    kept, mask, ids_restore = tiny_model.random_masking(x, ratio, noise)
    keep = int(L * (1 - ratio))
    assert kept.shape == (N, keep, D)
    assert torch.all(mask.sum(1) == L - keep)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(N, L))
    for n in range(N):
        kept_ids = ids_shuffle[n, :keep]
        assert torch.all(mask[n, kept_ids] == 0)  # 0 = kept, 1 = removed
        assert torch.equal(kept[n], x[n, kept_ids])
        # the kept patches are the ones with the smallest noise
        assert noise[n, kept_ids].max() < noise[n][mask[n] == 1].min()


def test_loss_ignores_visible_patches(tiny_model):
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 192)
    mask = torch.zeros(2, 16)
    mask[:, :12] = 1
    loss = tiny_model.forward_loss(imgs, pred, mask)
    pred2 = pred.clone()
    pred2[:, 12:] += 100.0  # change only the visible patches
    assert torch.allclose(loss, tiny_model.forward_loss(imgs, pred2, mask))
    pred3 = pred.clone()
    pred3[:, 0] += 1.0  # a removed patch changes the loss
    assert not torch.allclose(loss, tiny_model.forward_loss(imgs, pred3, mask))
    # and it is the plain mean over removed patches of the per-patch MSE
    target = tiny_model.patchify(imgs)
    expect = ((pred - target) ** 2).mean(-1)[:, :12].mean()
    assert torch.allclose(loss, expect, atol=1e-6)


def test_norm_pix_target_statistics():
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch8", norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32) * 5 + 3
    mask = torch.ones(2, 16)
    # with pred = 0 the loss is the mean squared normalized target: each patch has mean 0, var ~1
    target = model.patchify(imgs)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert torch.allclose(normed.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(normed.var(-1), torch.ones(2, 16), atol=1e-3)
    loss = model.forward_loss(imgs, torch.zeros(2, 16, 192), mask)
    assert torch.allclose(loss, (normed**2).mean(), atol=1e-5)
    # a prediction equal to the normalized target has zero loss
    assert model.forward_loss(imgs, normed, mask).item() < 1e-8


def test_every_parameter_gets_a_gradient(tiny_model):
    loss, pred, mask = tiny_model(torch.randn(2, 3, 32, 32))
    loss.backward()
    for name, p in tiny_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name in ("pos_embed", "decoder_pos_embed")


def test_fixed_noise_gives_same_loss_and_forward_shapes(tiny_model):
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    l1, pred, mask = tiny_model(imgs, 0.75, noise)
    l2, _, _ = tiny_model(imgs, 0.75, noise)
    assert torch.equal(l1, l2)
    assert pred.shape == (2, 16, 192) and mask.shape == (2, 16)
    assert torch.equal(mask, (torch.argsort(torch.argsort(noise, 1), 1) >= 4).float())


def _official_names(depth: int, decoder_depth: int) -> set[str]:
    """The state-dict keys of facebookresearch/mae models_mae.py (timm 0.3.2 Block), written out."""
    block = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    names = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
        "decoder_embed.weight",
        "decoder_embed.bias",
        "mask_token",
        "decoder_pos_embed",
        "decoder_norm.weight",
        "decoder_norm.bias",
        "decoder_pred.weight",
        "decoder_pred.bias",
    }
    names |= {f"blocks.{i}.{b}" for i in range(depth) for b in block}
    names |= {f"decoder_blocks.{i}.{b}" for i in range(decoder_depth) for b in block}
    return names


def test_official_parameter_names_and_shapes():
    model = build_model("mae_vit_base_patch16")
    sd = model.state_dict()
    assert set(sd) == _official_names(12, 8)
    assert sd["pos_embed"].shape == (1, 197, 768)
    assert sd["decoder_pos_embed"].shape == (1, 197, 512)
    assert sd["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert sd["decoder_pred.weight"].shape == (16 * 16 * 3, 512)
    assert sum(p.numel() for p in model.parameters()) == 111_907_840  # the official ViT-B MAE with its decoder
    # a state dict with exactly the official names loads strictly into a differently initialized model,
    # and then reproduces the loss for the same noise (which differed before)
    torch.manual_seed(123)
    other = build_model("mae_vit_base_patch16")
    imgs, noise = torch.randn(1, 3, 224, 224), torch.rand(1, 196)
    with torch.no_grad():
        assert not torch.equal(model(imgs, 0.75, noise)[0], other(imgs, 0.75, noise)[0])
        other.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
        assert torch.equal(model(imgs, 0.75, noise)[0], other(imgs, 0.75, noise)[0])


def test_large_and_huge_names():
    arch = PRESETS["mae_vit_huge_patch14"]
    assert (arch.patch_size, arch.embed_dim, arch.depth, arch.decoder_embed_dim, arch.decoder_depth) == (
        14,
        1280,
        32,
        512,
        8,
    )
    with torch.device("meta"):
        large = MaskedAutoencoderViT(PRESETS["mae_vit_large_patch16"])
    assert set(large.state_dict()) == _official_names(24, 8)


def test_initialization():
    torch.manual_seed(0)
    model = build_model("mae_vit_base_patch16")
    # fixed sin-cos embeddings, the cls slot zero
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(768))
    expect = torch.from_numpy(sincos_pos_embed_2d(768, 14, cls_token=True)).float()
    assert torch.allclose(model.pos_embed[0], expect)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    # xavier_uniform bound for Linear layers, zero bias, LayerNorm 1/0, tokens ~N(0, 0.02)
    w = model.blocks[0].attn.qkv.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    pw = model.patch_embed.proj.weight.view(768, -1)
    assert pw.abs().max() <= (6 / (768 + 768)) ** 0.5
    assert 0.015 < model.cls_token.std() < 0.025 and 0.015 < model.mask_token.std() < 0.025
    # sin-cos embedding: half the channels are sin/cos of the column, half of the row
    e = sincos_pos_embed_2d(8, 2, cls_token=False)
    assert e.shape == (4, 8)
    assert e[0, 0] == 0.0 and e[0, 2] == 1.0  # sin(0), cos(0) for position (0, 0)
    assert e[1, 0] == pytest.approx(torch.sin(torch.tensor(1.0)).item())  # column 1, first frequency


@pytest.mark.parametrize("model_type,size", [("mae_vit_tiny_patch8", 32), ("mae_vit_base_patch16", 224)])
def test_embedding_only_kept_patches_matches_the_official_order(model_type, size):
    """embed_kept_only embeds after masking; loss, prediction, mask and gradients are those of the
    official embed-then-mask order for the same weights and noise."""
    torch.manual_seed(0)
    official = build_model(model_type, norm_pix_loss=True)
    kept = build_model(model_type, norm_pix_loss=True, embed_kept_only=True)
    kept.load_state_dict(official.state_dict())  # no new parameters: checkpoints stay interchangeable
    imgs = torch.randn(2, 3, size, size)
    noise = torch.rand(2, official.num_patches)
    outs = []
    for m in (official, kept):
        loss, pred, mask = m(imgs, 0.75, noise)
        loss.backward()
        outs.append((loss, pred, mask, m.patch_embed.proj.weight.grad, m.cls_token.grad))
    (l0, p0, m0, gw0, gc0), (l1, p1, m1, gw1, gc1) = outs
    assert torch.equal(m0, m1)
    assert torch.allclose(l0, l1, rtol=1e-5) and torch.allclose(p0, p1, atol=1e-4)
    assert torch.allclose(gw0, gw1, rtol=1e-3, atol=1e-6) and torch.allclose(gc0, gc1, rtol=1e-3, atol=1e-7)
    # and the embedding really sees only the kept patches: changing a removed patch's pixels changes nothing
    p = official.arch.patch_size
    removed = int(m0[0].nonzero()[0])
    r, c = divmod(removed, size // p)
    imgs2 = imgs.clone()
    imgs2[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 10.0
    with torch.no_grad():
        latent_a, _, _ = kept.forward_encoder(imgs, 0.75, noise)
        latent_b, _, _ = kept.forward_encoder(imgs2, 0.75, noise)
    assert torch.equal(latent_a, latent_b)
