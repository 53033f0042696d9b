"""torch.hub entry points and the exported backbone: loadable with strict=True here and under timm's names."""
import os

import pytest
import torch

import hubconf
from model import build_backbone


def timm_vit_keys(depth: int) -> set[str]:
    """The state-dict keys of timm's VisionTransformer(num_classes=0, class_token=True, qkv_bias=True) and of
    facebookresearch/dino's vision_transformer.py VisionTransformer: the same names."""
    block = [f"{part}.{p}" for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")]
    return ({"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
             "norm.bias"} | {f"blocks.{i}.{name}" for i in range(depth) for name in block})


def test_export_loads_strictly_into_our_vit_and_has_timm_names(tiny_run, tmp_path):
    out = str(tmp_path / "teacher_backbone.pth")
    hubconf.main(["--checkpoint", str(tiny_run[0] / "checkpoint.pth"), "--out", out])
    state = torch.load(out, weights_only=True)
    assert set(state) == timm_vit_keys(2)  # TINY: 2 blocks
    vit = build_backbone("custom", 16, 4, use_mask_token=False, embed_dim=32, depth=2, num_heads=2)
    vit.load_state_dict(state, strict=True)
    teacher = tiny_run[1].teacher.backbone.state_dict()
    assert all(torch.equal(state[k], teacher[k]) for k in state)
    with pytest.raises(SystemExit, match="directory does not exist"):
        hubconf.main(["--checkpoint", str(tiny_run[0] / "checkpoint.pth"), "--out", str(tmp_path / "no" / "x.pth")])


def test_hub_entries_build_every_arch_and_load_published_layouts(tmp_path):
    for name, depth in (("vit_tiny", 12), ("vit_small", 12), ("vit_base", 12), ("vit_large", 24)):
        assert set(getattr(hubconf, name)(img_size=32).state_dict()) == timm_vit_keys(depth)
    vit = hubconf.vit_tiny(img_size=32)
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "dino.pth")
    loaded = hubconf.vit_tiny(pretrained=str(tmp_path / "dino.pth"))  # DINO's checkpoint layout
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vit.state_dict().values()))
    assert loaded.interpolate_offset == 0.1  # published weights resample positions as DINO does
    with pytest.raises(SystemExit, match="no such file"):
        hubconf.vit_small(pretrained=str(tmp_path / "missing.pth"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hub = torch.hub.load(root, "vit_tiny", source="local", pretrained=str(tmp_path / "dino.pth"))
    assert all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), vit.state_dict().values()))
