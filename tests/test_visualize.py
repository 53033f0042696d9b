"""visualize.py: the explicit attention against a reference, and each picture on the tiny run's checkpoint."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import visualize
from model import VisionTransformer, build_backbone


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3).eval()


def test_explicit_attention_matches_softmax_reference_and_the_sdpa_path():
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    tokens, weights = vit.last_self_attention(x)
    # Reference from the last block's own qkv weights: softmax(q k^T / sqrt(d)) per head, d = D / H.
    z = vit.prepare_tokens(x)
    z = vit.blocks[0](z)
    block = vit.blocks[1]
    h = block.norm1(z)  # (B, N, D)
    W, b = block.attn.qkv.weight, block.attn.qkv.bias
    D, H = 48, 3
    d = D // H
    for head in range(H):
        q = h @ W[head * d:(head + 1) * d].T + b[head * d:(head + 1) * d]  # (B, N, d)
        k = h @ W[D + head * d:D + (head + 1) * d].T + b[D + head * d:D + (head + 1) * d]
        reference = (q @ k.transpose(1, 2) / math.sqrt(d)).softmax(-1)  # (B, N, N)
        torch.testing.assert_close(weights[:, head], reference)
    assert weights.shape == (2, H, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, H, 17))
    # The explicit path changes nothing downstream: same block output and same final tokens as the SDPA path.
    torch.testing.assert_close(block.forward_with_attention(z)[0], block(z))
    torch.testing.assert_close(tokens, vit(x))


def run(picture, ckpt, out, *extra):
    return visualize.main([picture, "--checkpoint", str(ckpt), "--out", str(out), *extra])


@pytest.mark.parametrize("picture, rows, columns, text_lines", [
    ("attention", 2, 2 + 2, 1),  # image, 2 heads, mean
    ("sops", 3, 1 + 2, 2),  # anchor + k = 2 SEs
    ("neighbors", 2, 1 + 3, 2),  # query + 3 neighbours
])
def test_each_picture_is_a_png_of_the_expected_size(tiny_run, tmp_path, picture, rows, columns, text_lines):
    ckpt = tiny_run[0] / "checkpoint.pth"
    out = tmp_path / f"{picture}.png"
    run(picture, ckpt, out, "--num_images", "2", "--num_sops", "3", "--k", "2" if picture == "sops" else "3",
        "--tile", "32")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        width, height = image.size
    cell_h = 32 + visualize.PAD + text_lines * visualize.LINE
    assert width == visualize.PAD + columns * (32 + visualize.PAD)
    header = visualize.LINE if picture != "attention" else 0
    body = rows * cell_h + header + 2 * visualize.PAD
    assert height > body and (height - body) % visualize.LINE == 0  # plus whole lines of caption
    # Same seed, same picture; another seed picks other images.
    again = tmp_path / "again.png"
    run(picture, ckpt, again, "--num_images", "2", "--num_sops", "3", "--k", "2" if picture == "sops" else "3",
        "--tile", "32")
    assert out.read_bytes() == again.read_bytes()


def test_the_memory_index_traces_sops_to_training_images(tiny_run):
    _, trainer = tiny_run
    memory = trainer.method.class_memory
    # After 2 epochs of 16 steps x 32 images into 256 rows, every row came from a training image.
    assert (memory.index >= 0).all() and (memory.index < 512).all()
    sops = memory.draw(8, 2, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(memory.memory[sops.rows].flatten(0, 1), sops.support)
    # The last enqueue holds the second global crop of the last batch: its images are the last batch's indices.
    last = data.epoch_batches(512, 32, 1, 0)[-1]  # epoch 1, last batch of the 2-epoch run
    ptr = int(memory.ptr)
    assert torch.equal(memory.index[(ptr - 32 + torch.arange(32)) % 256], last)


def test_attention_of_a_plain_state_dict_on_image_files(tmp_path):
    torch.manual_seed(0)
    torch.save(build_backbone("vit_tiny", 224, 16, use_mask_token=False).state_dict(), tmp_path / "plain.pth")
    paths = []
    for i, size in enumerate([(40, 30), (20, 50)]):
        path = tmp_path / f"im{i}.png"
        Image.new("RGB", size, (30 * i, 100, 200)).save(path)
        paths.append(str(path))
    out = tmp_path / "files.png"
    run("attention", tmp_path / "plain.pth", out, "--arch", "vit_tiny", "--patch_size", "16", "--image_size", "32",
        "--images", *paths, "--tile", "32")
    with Image.open(out) as image:
        assert image.width == visualize.PAD + (1 + 3 + 1) * (32 + visualize.PAD)  # image, 3 heads, mean
    message = one_line_error(lambda: run("attention", tmp_path / "plain.pth", out, "--images", *paths))
    assert "--arch" in message  # a plain state dict needs its architecture


def one_line_error(call):
    with pytest.raises(SystemExit) as info:
        call()
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_inputs_give_one_clear_line(tiny_run, tmp_path):
    ckpt = tiny_run[0] / "checkpoint.pth"
    out = tmp_path / "x.png"
    assert "no such file" in one_line_error(lambda: run("neighbors", tmp_path / "missing.pth", out))
    assert "does not exist" in one_line_error(lambda: run("sops", ckpt, tmp_path / "no_dir" / "x.png"))
    assert "--images" in one_line_error(lambda: run("attention", ckpt, out, "--images", "nope.jpg"))
    # Sizes that would write an unreadable (or enormous) picture: a 100000-row PNG, a zero tile.
    assert "--num_sops 100000: valid: 1 to 64" in one_line_error(lambda: run("sops", ckpt, out, "--num_sops", "100000"))
    assert "--tile 0: valid: 1 to 1024" in one_line_error(lambda: run("neighbors", ckpt, out, "--tile", "0"))
    assert "--k -1" in one_line_error(lambda: run("neighbors", ckpt, out, "--k", "-1"))
    # An older checkpoint: its class memory has no index buffer.
    old = torch.load(ckpt, weights_only=True)
    del old["class_memory"]["index"]
    torch.save(old, tmp_path / "old.pth")
    assert "no index buffer" in one_line_error(lambda: run("sops", tmp_path / "old.pth", out))
    # A plain state dict: attention works with --arch, sops has no memory to draw from.
    plain = {k.removeprefix("backbone."): v for k, v in old["teacher"].items() if k.startswith("backbone.")}
    torch.save(plain, tmp_path / "plain.pth")
    assert "plain state dict" in one_line_error(lambda: run("sops", tmp_path / "plain.pth", out))
    # A baseline's checkpoint: no SOPs to draw.
    old["config"]["method"] = "massl"
    torch.save(old, tmp_path / "massl.pth")
    assert "--method massl, which draws no SOPs" in one_line_error(lambda: run("sops", tmp_path / "massl.pth", out))
    assert not out.exists()


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "visualize.py", "sops", "--checkpoint", str(tmp_path / "none.pth"),
                             "--out", str(tmp_path / "x.png")], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: --checkpoint") and len(result.stderr.strip().splitlines()) == 1


def test_training_on_an_image_folder_stores_the_batches_dataset_indices(tmp_path):
    import train
    from conftest import TINY
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / f"class{c}").mkdir(parents=True)
            for i in range(12):
                Image.new("RGB", (20, 18), (20 * i, 120 * c, 90)).save(tmp_path / split / f"class{c}" / f"{i}.png")
    trainer = train.main(TINY + ["--dataset", "folder", "--data_path", str(tmp_path), "--num_workers", "0",
                                 "--batch_size_per_gpu", "8", "--knn_every", "0", "--max_steps", "2",
                                 "--output_dir", str(tmp_path / "out")])
    batches = data.epoch_batches(24, 8, 0, 0)[:2]  # the run's first two batches (epoch 0, seed 0)
    expected = torch.full((256,), -1)
    expected[:16] = batches.flatten()
    assert torch.equal(trainer.method.class_memory.index, expected)
    assert torch.equal(trainer.method.patch_memory.index[:16], batches.flatten())


def test_sops_draws_rows_of_unknown_source_as_blank_tiles(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run[0] / "checkpoint.pth", weights_only=True)
    ckpt["class_memory"]["index"][::2] = -1  # every other row as if still random
    torch.save(ckpt, tmp_path / "half.pth")
    out = tmp_path / "half.png"
    run("sops", tmp_path / "half.pth", out, "--num_sops", "3", "--tile", "32")
    # The same draw as visualize.py's (seed 0, the training M and k), to know which tiles must be blank.
    bank = visualize.MemoryBank(256, 32)
    bank.load_state_dict(ckpt["class_memory"])
    sops = bank.draw(32, 2, 0.1, torch.Generator().manual_seed(0))
    unknown = bank.index[sops.rows[2]] < 0  # (k + 1,) the last row's tiles
    assert unknown.any() and not unknown.all()
    with Image.open(out) as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())  # (H, W, 3)
    y = pixels.shape[0] - visualize.PAD - (32 + visualize.PAD + 2 * visualize.LINE)  # top of the last row
    for c, blank in enumerate(unknown.tolist()):
        x = visualize.PAD + c * (32 + visualize.PAD)
        block = pixels[y + 12:y + 20, x + 12:x + 20]  # the tile's centre
        assert bool((block == 225).all()) == blank, c
