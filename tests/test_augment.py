"""Tests for augment.py: multicrop geometry and photometry (padded canvases included), block masks. CPU, seeded."""
import colorsys
import math
import random

import numpy as np
import pytest
import torch

import augment
from augment import (BlockMaskGenerator, MultiCropAugmentation, gaussian_blur, replicate_edges, resized_crops,
                     sample_crop_boxes, shift_hue)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    std, mean = torch.tensor(augment.IMAGENET_STD), torch.tensor(augment.IMAGENET_MEAN)
    return x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)


def half_black_half_white(batch: int, side: int = 32) -> torch.Tensor:
    """uint8 (batch, 3, side, side): left half 0, right half 255."""
    images = torch.zeros(batch, 3, side, side, dtype=torch.uint8)
    images[..., side // 2:] = 255
    return images


# ----------------------------------------------------------------------------------------------------- multicrop
def test_multicrop_counts_sizes_dtypes_ranges():
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    global_crops, local_crops = MultiCropAugmentation(32, 16, 6)(images, gen())
    assert global_crops.shape == (8, 3, 32, 32) and local_crops.shape == (24, 3, 16, 16)
    assert global_crops.dtype == local_crops.dtype == torch.float32
    for crops in (global_crops, local_crops):
        values = unnormalize(crops)
        assert values.min() >= -1e-5 and values.max() <= 1 + 1e-5
    global_crops, local_crops = MultiCropAugmentation(24, 8, 0, interpolation="bilinear")(images, gen())
    assert global_crops.shape == (8, 3, 24, 24) and local_crops.shape == (0, 3, 8, 8)


def test_multicrop_same_seed_same_crops():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    augment = MultiCropAugmentation(32, 16, 2)
    first, second, other = augment(images, gen(1)), augment(images, gen(1)), augment(images, gen(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_resized_crops_identity_and_mirror():
    images = torch.rand(2, 3, 16, 16)
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    for mode in ("bicubic", "bilinear"):
        same = resized_crops(images, box, torch.tensor([False, False]), 16, mode)
        mirrored = resized_crops(images, box, torch.tensor([True, True]), 16, mode)
        torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
        torch.testing.assert_close(mirrored, images.flip(-1), atol=1e-5, rtol=0)


def test_resized_crops_cut_the_box_view_major():
    images = torch.rand(2, 3, 32, 32)
    boxes = torch.tensor([[4.0, 8.0, 16.0, 16.0], [0.0, 2.0, 16.0, 16.0],  # view 0 of images 0 and 1
                          [10.0, 0.0, 16.0, 16.0], [16.0, 16.0, 16.0, 16.0]])  # view 1
    flip = torch.tensor([False, True, True, False])
    crops = resized_crops(images, boxes, flip, 16)  # same size as the box: a 1:1 copy
    torch.testing.assert_close(crops[0], images[0, :, 4:20, 8:24], atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[1], images[1, :, 0:16, 2:18].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[2], images[0, :, 10:26, 0:16].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[3], images[1, :, 16:32, 16:32], atol=1e-5, rtol=0)


def test_resized_crops_upsample_a_step():
    images = half_black_half_white(1).float() / 255  # step between columns 15 and 16
    box = torch.tensor([[0.0, 8.0, 32.0, 16.0]])  # columns 8..23, stretched x2: the step lands mid-output
    for flip in (False, True):
        crop = resized_crops(images, box, torch.tensor([flip]), 32, "bilinear")[0, 0]
        crop = crop.flip(-1) if flip else crop
        assert torch.all(crop[:, :15] == 0) and torch.all(crop[:, 17:] == 1)
    left = resized_crops(images, torch.tensor([[0.0, 0.0, 32.0, 12.0]]), torch.tensor([False]), 32)
    assert torch.all(left == 0)  # a box 4 px clear of the step sees only black, even with bicubic taps


def test_resized_crops_antialias_mip_blend():
    images = torch.rand(2, 3, 32, 32, generator=gen())
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2)
    no_flip = torch.tensor([False, False])
    halved = resized_crops(images, whole, no_flip, 16, antialias=True)  # shrunk 2x: the 2 x 2 averages
    torch.testing.assert_close(halved, torch.nn.functional.avg_pool2d(images, 2), atol=1e-5, rtol=0)
    assert (resized_crops(images, whole, no_flip, 16) - halved).abs().amax() > 0.05  # aliased without it
    box = torch.tensor([[3.0, 5.0, 16.0, 16.0]] * 2)  # not shrunk: antialias changes nothing
    assert torch.equal(resized_crops(images, box, no_flip, 20, antialias=True), resized_crops(images, box, no_flip, 20))
    shrunk = torch.tensor([[0.0, 0.0, 24.0, 24.0]] * 2)  # 1.5x: log2(1.5) of the way to the half-size sample
    t = math.log2(1.5)
    expected = ((1 - t) * resized_crops(images, shrunk, no_flip, 16)
                + t * resized_crops(torch.nn.functional.avg_pool2d(images, 2), shrunk / 2, no_flip, 16))
    torch.testing.assert_close(resized_crops(images, shrunk, no_flip, 16, antialias=True), expected, atol=1e-5,
                               rtol=0)


def test_sample_crop_boxes_follow_random_resized_crop():
    boxes = sample_crop_boxes(2000, 40, 50, (0.05, 0.25), gen())
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round()) and torch.all((top >= 0) & (left >= 0))
    assert torch.all((top + h <= 40) & (left + w <= 50))
    fraction = h * w / (40 * 50)
    assert fraction.min() > 0.04 and fraction.max() < 0.27  # scale range, up to rounding
    assert (w / h).min() > 0.6 and (w / h).max() < 1.6
    assert torch.equal(boxes, sample_crop_boxes(2000, 40, 50, (0.05, 0.25), gen()))
    # no candidate fits: torchvision falls back to the central crop at the nearest allowed aspect ratio
    assert torch.equal(sample_crop_boxes(3, 32, 32, (1.5, 2.0), gen()), torch.tensor([[0.0, 0, 32, 32]] * 3))
    assert torch.equal(sample_crop_boxes(2, 10, 40, (1.5, 2.0), gen()), torch.tensor([[0.0, 13, 10, 13]] * 2))


def test_shift_hue_matches_colorsys():
    pixels = torch.rand(6, 3, 4, 4)
    pixels[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5])  # grey: hue undefined, must stay grey
    shift = torch.tensor([0.0, 0.1, -0.1, 0.5, 0.33, -0.05])
    out = shift_hue(pixels, shift)
    for n in range(6):
        for i in range(4):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*pixels[n, :, i, j].tolist())
                expected = colorsys.hsv_to_rgb((h + shift[n].item()) % 1, s, v)
                torch.testing.assert_close(out[n, :, i, j], torch.tensor(expected), atol=1e-5, rtol=0)


def test_gaussian_blur_reference_and_identity():
    image = torch.zeros(2, 3, 21, 21)
    image[:, :, 10, 10] = 1
    out = gaussian_blur(image, torch.tensor([0.0, 1.5]), radius=6)
    assert torch.equal(out[0], image[0])  # sigma 0 leaves the crop unchanged
    offsets = torch.arange(-6, 7, dtype=torch.float32)
    kernel = torch.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    kernel = kernel / kernel.sum()
    expected = torch.zeros(21, 21)
    expected[4:17, 4:17] = kernel[:, None] * kernel[None, :]
    torch.testing.assert_close(out[1, 1], expected, atol=1e-6, rtol=0)


def test_grayscale_gives_equal_channels_about_20_percent():
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    global_crops, _ = MultiCropAugmentation(32, 16, 0)(images, gen())
    values = unnormalize(global_crops)
    grey = (values.amax(1) - values.amin(1)).flatten(1).amax(1) < 1e-5  # (2B,) crops with equal channels
    assert 0.12 < grey.float().mean() < 0.28


def test_solarize_only_on_global_crop_2():
    # a white image stays uniform through every op; only solarisation can bring it below 0.5
    B = 300
    white = torch.full((B, 3, 32, 32), 255, dtype=torch.uint8)
    global_crops, local_crops = MultiCropAugmentation(32, 16, 2)(white, gen())
    dark_global = unnormalize(global_crops).flatten(1).amax(1) < 0.5
    assert not dark_global[:B].any() and not (unnormalize(local_crops) < 0.5).any()
    assert 0.12 < dark_global[B:].float().mean() < 0.28


def test_blur_always_on_global_1_rarely_on_global_2_half_on_locals():
    # crops of the whole step image: pointwise ops keep a one-pixel step, only the blur spreads it
    B = 300
    augment = MultiCropAugmentation(32, 32, 2, global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0))
    global_crops, local_crops = augment(half_black_half_white(B), gen())

    def blurred(crops):  # fraction of crops whose step is spread, among those where a step is left
        profile = unnormalize(crops).mean((1, 2))  # (N, W): the image is constant along y
        span = profile.amax(1) - profile.amin(1)  # 0 where solarising merged the two levels
        step = (profile[:, 1:] - profile[:, :-1]).abs().amax(1)
        return (step / span < 0.999)[span > 0.05].float().mean()

    assert blurred(global_crops[:B]) > 0.8  # sigma < 0.26 px is invisible here: ~92 % expected
    assert blurred(global_crops[B:]) < 0.2
    assert 0.33 < blurred(local_crops) < 0.6


def padded_canvases(sizes: list[tuple[int, int]], side: int, fill: int = 255, seed: int = 0):
    """uint8 (B, 3, side, side) canvases, image b a constant colour (channels in [30, 200]) over the top-left
    sizes[b] = (h, w), the rest `fill` (a value no image has); and the colours float (B, 3) in [0, 1]."""
    colours = torch.randint(30, 201, (len(sizes), 3), generator=gen(seed), dtype=torch.uint8)
    canvases = torch.full((len(sizes), 3, side, side), fill, dtype=torch.uint8)
    for b, (h, w) in enumerate(sizes):
        canvases[b, :, :h, :w] = colours[b].view(3, 1, 1)
    return canvases, torch.tensor(sizes), colours.float() / 255


def test_canvas_crops_never_contain_padding():
    sizes = [(64, 64), (20, 64), (64, 13), (7, 9), (33, 50), (64, 40)]
    canvases, valid, colours = padded_canvases(sizes, 64)
    B = len(sizes)
    for scale in ((0.05, 0.25), (0.25, 1.0), (1.0, 1.0)):
        boxes = sample_crop_boxes(20 * B, valid[:, 0].repeat(20), valid[:, 1].repeat(20), scale, gen())
        flip = torch.rand(20 * B, generator=gen(1)) < 0.5
        expected = colours.repeat(20, 1).view(20 * B, 3, 1, 1).expand(20 * B, 3, 24, 24)
        for mode in ("bicubic", "bilinear"):
            crops = resized_crops(replicate_edges(canvases, valid).float() / 255, boxes, flip, 24, mode)
            torch.testing.assert_close(crops, expected, atol=1e-5, rtol=0)  # only the image's own colour
            leaky = resized_crops(canvases.float() / 255, boxes, flip, 24, mode)  # the test sees a leak
            assert (leaky - expected).abs().amax() > 0.01
    # the whole augmentation: photometric ops keep a constant crop constant, a leak of padding would not be
    global_crops, local_crops = MultiCropAugmentation(32, 16, 4)(canvases, gen(), valid)
    for crops in (global_crops, local_crops):
        spread = crops.flatten(2).amax(2) - crops.flatten(2).amin(2)  # (N, 3)
        assert spread.amax() < 1e-4


def test_canvas_crops_equal_crops_of_the_image_alone():
    images = torch.randint(0, 256, (3, 3, 30, 44), dtype=torch.uint8, generator=gen())
    canvases = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8, generator=gen(1))  # noise as padding
    canvases[:, :, :30, :44] = images
    augment = MultiCropAugmentation(32, 16, 3)
    alone = augment(images, gen(2), torch.tensor([[30, 44]] * 3))  # the canvas path on unpadded images
    padded = augment(canvases, gen(2), torch.tensor([[30, 44]] * 3))
    for a, b in zip(alone, padded):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=0)


def test_boxes_reach_every_pixel_of_each_valid_region():
    sizes = torch.tensor([[30, 60], [60, 20], [45, 45]])
    for scale in ((0.05, 0.25), (0.25, 1.0)):
        boxes = sample_crop_boxes(3 * 2000, sizes[:, 0].repeat(2000), sizes[:, 1].repeat(2000), scale, gen())
        coverage = torch.zeros(3, 64, 64)
        for k, (top, left, h, w) in enumerate(boxes.long().tolist()):
            coverage[k % 3, top:top + h, left:left + w] += 1
        for b, (h, w) in enumerate(sizes.tolist()):
            assert coverage[b, :h, :w].min() > 0  # the image's sides and corners are reachable
            assert coverage[b, h:].sum() == 0 and coverage[b, :, w:].sum() == 0  # never the padding


# ----------------------------------------------------------------------------------------------------- block masks
@pytest.mark.parametrize("grid", [8, 14])
def test_mask_ratio_ibot_recipe_and_fixed(grid):
    masks = BlockMaskGenerator(grid)(4000, gen())
    assert masks.shape == (4000, grid * grid) and masks.dtype == torch.bool
    assert abs(masks.float().mean() - 0.15) < 0.03
    assert 0.45 < (~masks.any(1)).float().mean() < 0.55  # half the crops unmasked
    fixed = BlockMaskGenerator(grid, pred_ratio=(0.3,), pred_ratio_var=(0.0,))(4000, gen())
    assert abs(fixed.float().mean() - 0.3) < 0.03 and fixed.any(1).all()


def test_mask_counts_within_targets_and_deterministic():
    generator = BlockMaskGenerator(14, pred_ratio=(0.0, 0.3, 0.5), pred_ratio_var=(0.0, 0.2, 0.1))
    targets = generator.sample_targets(3000, gen())
    masks = generator.block_masks(targets, gen(1))
    assert torch.all(masks.sum(1) <= targets)
    assert torch.equal(generator(100, gen(5)), generator(100, gen(5)))
    assert not torch.equal(generator(100, gen(5)), generator(100, gen(6)))


def test_mask_one_round_is_one_rectangle():
    masks = BlockMaskGenerator(14, pred_ratio=(0.4,), pred_ratio_var=(0.0,), rounds=1)(500, gen()).view(500, 14, 14)
    assert masks.any((1, 2)).float().mean() > 0.5
    for mask in masks[masks.any((1, 2))]:
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # the bounding box is filled


def beit_reference_ratio(grid: int, ratio: float, num: int, rng: random.Random) -> float:
    """Mean masked fraction of the sequential iBOT/BEiT loop (bytedance/ibot loader.py ImageFolderMask), rewritten
    as a plain loop."""
    low, total = (grid // 3) ** 2, 0
    for _ in range(num):
        mask, count, high = np.zeros((grid, grid), bool), 0, ratio * grid * grid
        while count < high:
            budget, delta = high - count, 0
            for _ in range(10):
                area = rng.uniform(low, budget)
                aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < grid and h < grid:
                    top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
                    new = h * w - mask[top:top + h, left:left + w].sum()
                    if 0 < new <= budget:
                        mask[top:top + h, left:left + w] = True
                        delta = new
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta
        total += mask.sum()
    return total / (num * grid * grid)


@pytest.mark.parametrize("grid", [8, 14])
def test_mask_matches_beit_loop(grid):
    reference = beit_reference_ratio(grid, 0.3, 1500, random.Random(0))
    vectorised = BlockMaskGenerator(grid, (0.3,), (0.0,))(1500, gen()).float().mean().item()
    assert abs(vectorised - reference) < 0.005
