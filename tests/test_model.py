import pytest
import torch

from model import ProjectionHead, MultiCropWrapper, VisionTransformer, build_backbone


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)
    args.update(kw)
    return VisionTransformer(**args)


def test_output_shapes_at_two_resolutions():
    vit = tiny_vit().eval()
    assert vit(torch.randn(3, 3, 32, 32)).shape == (3, 1 + 64, 48)
    assert vit(torch.randn(3, 3, 16, 16)).shape == (3, 1 + 16, 48)  # local crop: 4 x 4 grid
    assert vit(torch.randn(2, 3, 32, 16)).shape == (2, 1 + 32, 48)  # non-square input
    head = ProjectionHead(48, 64, 16)
    z = head(vit(torch.randn(3, 3, 16, 16)))
    assert z.shape == (3, 17, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3, 17))


def test_position_embedding_interpolation():
    vit = tiny_vit()
    assert vit.interpolate_pos_encoding(8, 8) is vit.pos_embed  # native grid: no resampling
    pos = vit.interpolate_pos_encoding(4, 4)
    assert pos.shape == (1, 17, 48)
    torch.testing.assert_close(pos[:, 0], vit.pos_embed[:, 0])  # [CLS] position kept
    # A constant patch embedding stays constant under bicubic resizing.
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.5
    torch.testing.assert_close(vit.interpolate_pos_encoding(4, 4)[:, 1:], torch.full((1, 16, 48), 0.5))


def test_all_false_mask_equals_no_mask():
    vit = tiny_vit().eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(vit(x, torch.zeros(4, 64, dtype=torch.bool)), vit(x))


def test_masked_positions_carry_the_mask_token():
    vit = tiny_vit()
    with torch.no_grad():
        vit.masked_embed.normal_()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, [3, 10, 63]] = True
    tokens = vit.prepare_tokens(x, mask)  # (B, N, D) before the first block
    pos = vit.pos_embed[0, 1:]  # (P, D)
    expected = vit.masked_embed[0] + pos[[3, 10, 63]]
    torch.testing.assert_close(tokens[0, 1:][mask[0]], expected)
    unmasked = vit.patch_embed(x)[0] + pos
    torch.testing.assert_close(tokens[0, 1:][~mask[0]], unmasked[~mask[0]])
    torch.testing.assert_close(tokens[1, 1:], vit.patch_embed(x)[1] + pos)  # image 1 has no mask


def test_every_trainable_parameter_gets_a_finite_gradient():
    vit = tiny_vit(drop_path_rate=0.1)
    net = MultiCropWrapper(vit, ProjectionHead(48, 64, 16)).train()
    g, l = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)
    mask = torch.rand(4, 64) < 0.3
    cls, patch = net(g, mask, l)[:2]  # NetworkOutput.cls, .patch: every patch token without an index
    assert cls.shape == (4 + 6, 16) and patch.shape == (4 * 64, 16)
    index = torch.tensor([5, 70, 255])
    picked = net.eval()(g, mask, l, patch_index=index).patch  # (3, 16): the same tokens' embeddings, alone
    torch.testing.assert_close(picked, net(g, mask, l).patch[index], rtol=1e-5, atol=1e-6)
    net.train()
    (cls.square().sum() + patch.pow(3).sum()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_drop_path_only_in_training():
    vit = tiny_vit(drop_path_rate=0.5)
    x = torch.randn(8, 3, 32, 32)
    vit.eval()
    assert torch.equal(vit(x), vit(x))
    vit.train()
    assert not torch.equal(vit(x), vit(x))


def test_get_intermediate_layers():
    vit = tiny_vit(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    outs = vit.get_intermediate_layers(x, n=2)
    assert len(outs) == 2 and all(o.shape == (2, 65, 48) for o in outs)
    torch.testing.assert_close(outs[-1], vit(x))


# The DINO/timm ViT-S/16 layout, written out by hand: a published backbone state dict has exactly these keys.
def dino_vit_small_keys():
    keys = {"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384), "patch_embed.proj.weight": (384, 3, 16, 16),
            "patch_embed.proj.bias": (384,), "norm.weight": (384,), "norm.bias": (384,)}
    for i in range(12):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (384,), b + "norm1.bias": (384,),
                     b + "attn.qkv.weight": (1152, 384), b + "attn.qkv.bias": (1152,),
                     b + "attn.proj.weight": (384, 384), b + "attn.proj.bias": (384,),
                     b + "norm2.weight": (384,), b + "norm2.bias": (384,),
                     b + "mlp.fc1.weight": (1536, 384), b + "mlp.fc1.bias": (1536,),
                     b + "mlp.fc2.weight": (384, 1536), b + "mlp.fc2.bias": (384,)})
    return keys


def test_dino_timm_key_names_and_shapes():
    teacher = build_backbone("vit_small", 224, 16, use_mask_token=False)
    got = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    assert got == dino_vit_small_keys()
    student = build_backbone("vit_small", 224, 16)
    assert set(student.state_dict()) - set(got) == {"masked_embed"}  # iBOT's name for the mask token
    # A DINO-layout state dict loads strictly into a teacher-style backbone, and non-strictly into a student.
    external = {k: torch.randn(s) for k, s in dino_vit_small_keys().items()}
    teacher.load_state_dict(external)
    missing, unexpected = student.load_state_dict(external, strict=False)
    assert missing == ["masked_embed"] and unexpected == []


@pytest.mark.parametrize("arch,width,depth,heads", [("vit_tiny", 192, 12, 3), ("vit_small", 384, 12, 6),
                                                    ("vit_base", 768, 12, 12), ("vit_large", 1024, 24, 16)])
def test_presets(arch, width, depth, heads):
    vit = build_backbone(arch, 32, 4)
    assert vit.embed_dim == width and len(vit.blocks) == depth and vit.blocks[0].attn.num_heads == heads


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge", 224, 16)


def test_dino_form_position_embedding_interpolation():
    """interpolate_offset 0.1 resamples as DINO/iBOT do: scale factor (h + 0.1) / g, which samples slightly off the
    pixel centres of the new grid; 0 samples at them. Both keep the native grid untouched."""
    torch.manual_seed(0)
    exact = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=2)
    dino = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=2, interpolate_offset=0.1)
    dino.load_state_dict(exact.state_dict())
    assert dino.interpolate_pos_encoding(8, 8) is dino.pos_embed
    grid = exact.pos_embed[:, 1:].reshape(1, 8, 8, 48).permute(0, 3, 1, 2)
    reference = torch.nn.functional.interpolate(grid, scale_factor=(3.1 / 8, 3.1 / 8), mode="bicubic",
                                                align_corners=False)  # DINO's call, written out
    torch.testing.assert_close(dino.interpolate_pos_encoding(3, 3)[:, 1:],
                               reference.permute(0, 2, 3, 1).reshape(1, 9, 48))
    assert not torch.allclose(dino.interpolate_pos_encoding(3, 3), exact.interpolate_pos_encoding(3, 3), atol=1e-3)
