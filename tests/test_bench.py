import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import model
import train
from model import Block, ProjectionHead


def test_vit_flops_hand_count_for_one_block():
    # One block, N = 5 tokens, D = 8, MLP ratio 4, in multiply-adds:
    # qkv 5*8*24 = 960, scores 5*5*8 = 200, weighted values 200, proj 5*8*8 = 320, fc1 5*8*32 = 1280, fc2 1280.
    assert bench.vit_flops_per_image(8, 1, 5) == 2 * (960 + 200 + 200 + 320 + 1280 + 1280)
    assert bench.vit_flops_per_image(8, 3, 5) == 3 * bench.vit_flops_per_image(8, 1, 5)


def math_attention(q, k, v):
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1) @ v


def test_vit_flops_match_torch_flop_counter(monkeypatch):
    # The counter does not see the CPU kernel of scaled_dot_product_attention: spell it as two matmuls.
    monkeypatch.setattr(model.F, "scaled_dot_product_attention", math_attention)
    block = Block(dim=64, num_heads=4, mlp_ratio=4.0, drop_path_rate=0.0)
    with FlopCounterMode(display=False) as counter:
        block(torch.randn(1, 17, 64))
    assert counter.get_total_flops() == bench.vit_flops_per_image(64, 1, 17)
    head = ProjectionHead(64, 128, 32)
    with FlopCounterMode(display=False) as counter:
        head(torch.randn(1, 1, 64))
    assert counter.get_total_flops() == bench.head_flops_per_token(64, 128, 32)


def test_model_flops_per_image_composition():
    cfg = train.parse_config(["--preset", "cifar", "--local_crops_number", "0"])
    D, P, head = 384, 64, bench.head_flops_per_token(384, 2048, 256)
    backbone = 2 * P * 3 * 16 * D + bench.vit_flops_per_image(D, 12, 1 + P)
    masked = 0.15 * P  # pred_ratio (0, 0.3): a mean of 15 % of the patches masked
    student_crop = backbone + int(head * (1 + masked))  # [CLS] and the masked patches
    teacher_crop = backbone + int(head * (1 + masked + 0.5))  # and one patch per image (2 crops) for the memory
    assert bench.model_flops_per_image(cfg) == 2 * teacher_crop + 3 * 2 * student_crop
    ibot = train.parse_config(["--preset", "cifar", "--local_crops_number", "0", "--method", "ibot"])
    assert bench.model_flops_per_image(ibot) == 2 * (backbone + head * (1 + P)) + 3 * 2 * student_crop  # c2: all


def test_model_flops_count_patch_tokens_in_the_head_only_when_a_loss_reads_them():
    flags = ["--preset", "cifar", "--local_crops_number", "0"]
    backbone = 2 * 64 * 3 * 16 * 384 + bench.vit_flops_per_image(384, 12, 65)
    cls_only = (2 + 3 * 2) * (backbone + bench.head_flops_per_token(384, 2048, 256))  # [CLS] alone in the head
    for method_flags in (["--patch_loss_weight", "0"], ["--method", "dino"]):
        cfg = train.parse_config(flags + method_flags)
        assert bench.model_flops_per_image(cfg) == cls_only < bench.model_flops_per_image(train.parse_config(flags))


def test_bench_runs_on_cpu():
    results = bench.main(["--configs", "cpu_demo", "--compile", "false", "--steps", "2", "--warmup", "1",
                          "--device", "cpu"])
    (r,) = results
    assert r["ms_per_step"] > 0 and r["images_per_s"] > 0 and r["mfu_percent"] is None
    assert 0 < r["augment_percent"] and 0 < r["memory_percent"]


def test_custom_configurations_from_train_flags(capsys):
    results = bench.main(["--custom", "mim0=--preset cpu_demo", "mim1=--preset cpu_demo --patch_loss_weight 1",
                          "--compile", "false", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    assert [r["config"] for r in results] == ["mim0", "mim1"]  # no default configurations besides them
    assert results[1]["gflops_per_image"] > results[0]["gflops_per_image"]  # the head on the patch tokens
    for bad, message in (("k0", "expected NAME=FLAGS"),
                         ("x=--preset cpu_demo --class_neighbors -1", "configuration x")):
        with pytest.raises(SystemExit):
            bench.main(["--custom", bad, "--device", "cpu"])
        assert message in capsys.readouterr().err


def test_json_names_the_run_and_peer_runs_against_a_stand_in_timm(tmp_path, monkeypatch):
    import json
    import sys
    import types

    from model import build_backbone

    def create_model(name, pretrained, num_classes):  # timm is not installed here: our ViT-S plays it
        assert (name, pretrained, num_classes) == ("vit_small_patch16_224", False, 0)
        model = build_backbone("vit_small", 224, 16, use_mask_token=False)
        model.forward_features = model.forward
        return model
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    r = bench.peer(torch.device("cpu"), batch=2, steps=1, warmup=1, compile_=False)
    assert r["ours_ms"] > 0 and r["timm_ms"] > 0 and r["ours_speed_over_timm"] == r["timm_ms"] / r["ours_ms"]
    out = tmp_path / "bench.json"
    bench.main(["--configs", "cpu_demo", "--compile", "false", "--steps", "1", "--warmup", "1", "--augment_only",
                "--device", "cpu", "--json", str(out)])
    (saved,) = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["torch"] == torch.__version__ and saved["config"] == "cpu_demo"
    assert saved["command"].startswith("python bench.py --configs cpu_demo") and saved["date"]
