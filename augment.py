"""Batched multicrop augmentation and block masks on the training device.

DINO/iBOT augment one PIL image at a time in DataLoader workers (facebookresearch/dino main_dino.py
DataAugmentationDINO, bytedance/ibot loader.py ImageFolderMask); here the multicrop augmentation and the masks are
computed for a whole batch on the training device (as airbench does), drawn from one torch.Generator, so a seed
fixes a batch exactly and the step needs no host sync. Batches are uint8 (B, 3, H, W) images, or padded canvases
with each image's valid size (folder datasets, data.ImageFolder), whose crops stay inside each image.

Shapes: B images, V views of one crop group (2 global or L local), G / l global / local crop size, g patch-grid side.
"""
import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------- multicrop
def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """float32 (n,) uniform in [low, high), on the generator's device."""
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel, in place on float (N, 3, H, W); Python scalars, so nothing is copied to the GPU."""
    for c in range(3):
        x[:, c].sub_(mean[c]).div_(std[c])
    return x


def sample_crop_boxes(n: int, height, width, scale: tuple[float, float], generator: torch.Generator,
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes for n crops: float (n, 4) = (top, left, h, w) in pixels.

    height, width: ints (one image size for all crops), or (n,) tensors giving each crop's own image size (the
    valid regions of padded canvases), the boxes then lie inside [0, height) x [0, width) of their image.
    torchvision semantics, vectorised: every crop draws `attempts` candidates (area fraction ~ U(scale), aspect
    log-uniform in ratio) and keeps the first that fits, else the central crop at the nearest allowed aspect.
    """
    per_crop = isinstance(height, torch.Tensor)
    if per_crop:
        height, width = height.float().view(n, 1), width.float().view(n, 1)
    area = _uniform(n * attempts, *scale, generator).view(n, attempts) * (height * width)
    aspect = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator).view(n, attempts).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first, found = fits.int().argmax(1, keepdim=True), fits.any(1)  # argmax gives the first of equal maxima
    if per_crop:  # the same fallback per crop; float64 rounds as Python's round does below
        height, width = height.squeeze(1), width.squeeze(1)
        fallback_h = torch.where(width / height < ratio[0], (width.double() / ratio[0]).round().float(), height)
        fallback_w = torch.where(width / height > ratio[1], (height.double() * ratio[1]).round().float(), width)
    else:
        fallback_w, fallback_h = width, height
        if width / height < ratio[0]:
            fallback_h = round(width / ratio[0])
        elif width / height > ratio[1]:
            fallback_w = round(height * ratio[1])
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    top = torch.where(found, (_uniform(n, 0, 1, generator) * (height - h + 1)).floor(), (height - fallback_h) // 2)
    left = torch.where(found, (_uniform(n, 0, 1, generator) * (width - w + 1)).floor(), (width - fallback_w) // 2)
    return torch.stack([top, left, h, w], 1)


def replicate_edges(images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Canvases (B, C, H, W) whose image b fills the top-left sizes[b] = (h, w) -> the same with the padding
    overwritten by copies of the image's last column, then last row (edge replication).

    resized_crops' bicubic taps read up to 2 px beyond a box; on the result they read what grid_sample's border
    padding would give on the image alone, so nothing of the padding reaches a crop, whatever it holds.
    """
    B, C, H, W = images.shape
    h, w = sizes[:, 0].view(B, 1, 1, 1), sizes[:, 1].view(B, 1, 1, 1)
    last_column = images.gather(3, (w - 1).expand(B, C, H, 1))  # (B, C, H, 1)
    images = torch.where(torch.arange(W, device=images.device).view(1, 1, 1, W) < w, images, last_column)
    last_row = images.gather(2, (h - 1).expand(B, C, 1, W))  # (B, C, 1, W)
    return torch.where(torch.arange(H, device=images.device).view(1, 1, H, 1) < h, images, last_row)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                  interpolation: str = "bicubic", antialias: bool = False,
                  sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Cut each box out of its image, mirror it where flip, resample it to size x size, in one grid_sample call.

    images float (B, 3, H, W); boxes float (V*B, 4) = (top, left, h, w) in pixels, view-major (row v*B + b crops
    image b); flip bool (V*B,). Returns float (V*B, 3, size, size). The box edges map onto the output edges, as
    when torchvision resizes the cut pixels; unlike it, bicubic taps at the box border read up to 2 pixels
    beyond the box. Without antialias nothing is low-pass filtered (right when crops are upsampled, as from
    32 px images); with it, a crop shrunk by s = box side / size is blended from the image and its 2 x 2-averaged
    half-size copy with weight clamp(log2 s, 0, 1) on the latter (mip-mapping over one octave: crops shrunk up to
    ~2.3x, as from a 512 px canvas to 224 px, without aliasing; a second grid_sample call). sizes (B, 2): valid
    regions of edge-replicated canvases (replicate_edges), whose half-size copies are edge-replicated in turn.
    """
    B, C, H, W = images.shape
    V = boxes.shape[0] // B
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(V * B, 2, 3, device=images.device)  # output [-1, 1] -> input [-1, 1], align_corners=False
    theta[:, 0, 0] = w / W * (1 - 2 * flip.float())  # a negative x scale mirrors the crop
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [V * B, C, size, size], align_corners=False)  # (V*B, size, size, 2)
    # the V grids of an image stacked vertically sample all its views at once, without copying the image V times
    grid = grid.view(V, B, size, size, 2).transpose(0, 1).reshape(B, V * size, size, 2)
    crops = F.grid_sample(images, grid, mode=interpolation, padding_mode="border", align_corners=False)
    crops = crops.view(B, C, V, size, size).permute(2, 0, 1, 3, 4).reshape(V * B, C, size, size)
    crops = crops.clamp_(0, 1) if interpolation == "bicubic" else crops  # bicubic overshoots at edges
    if not antialias:
        return crops
    shrink = (torch.maximum(h, w) / size).log2_().clamp_(0, 1).view(V * B, 1, 1, 1)  # 0: not shrunk, 1: >= 2x
    half = F.avg_pool2d(images, 2, ceil_mode=True)  # (B, C, ceil(H / 2), ceil(W / 2))
    if sizes is not None:  # as if the image alone had been halved: its own last row and column beyond it
        half = replicate_edges(half, (sizes + 1) // 2)
    half = resized_crops(half, boxes / 2, flip, size, interpolation)
    return torch.lerp(crops, half, shrink)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) of RGB (N, 3, H, W), torchvision's rgb_to_grayscale weights (ITU-R 601)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB (N, 3, H, W) in [0, 1] by shift (N,) turns, as torchvision's adjust_hue."""
    value, low = x.amax(1), x.amin(1)  # (N, H, W)
    chroma = (value - low).clamp_min(1e-12)
    saturation = (value - low) / value.clamp_min(1e-12)
    r, g, b = x.unbind(1)
    hue = torch.where(value == r, (g - b) / chroma, torch.where(value == g, 2 + (b - r) / chroma, 4 + (r - g) / chroma))
    hue = (hue / 6 + shift.view(-1, 1, 1)).remainder_(1)  # in turns
    # closed-form HSV -> RGB: channel n = 5, 3, 1 (R, G, B) is V - V S clamp(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6
    k = (torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) + 6 * hue[:, None]).remainder_(6)
    return value[:, None] - (value * saturation)[:, None] * torch.minimum(k, 4 - k).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each image of (N, 3, H, W) with its own Gaussian of std sigma (N,) pixels (0 = unchanged):
    separable kernels of 2*radius+1 taps, reflect padding, one grouped conv2d per direction."""
    N, C, H, W = x.shape
    radius = min(radius, H - 1, W - 1)  # reflect padding must be smaller than the image
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-6)[:, None]) ** 2)  # sigma 0 -> a unit impulse
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N*C, K): one filter per channel
    x = x.reshape(1, N * C, H, W)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=N * C)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=N * C)
    return x.view(N, C, H, W)


class MultiCropAugmentation:
    """DINO/iBOT multicrop of a whole uint8 batch: 2 global and L local crops per image (facebookresearch/dino
    main_dino.py DataAugmentationDINO).

    Per crop: RandomResizedCrop -> h-flip p 0.5 -> ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 -> grayscale p 0.2 ->
    Gaussian blur (p 1 / 0.1 on global crops 1 / 2, 0.5 on locals; sigma ~ U(blur_sigma) in pixels of the crop, as
    DINO's PIL blur after the resize) -> solarize (p 0.2, global crop 2 only) -> normalise. Deviations from the PIL
    pipeline: float arithmetic in [0, 1] (no rounding to uint8 between ops) and a fixed jitter order (brightness,
    contrast, saturation, hue) where torchvision shuffles the order per call.
    """

    GLOBAL_BLUR_P, GLOBAL_SOLARIZE_P, LOCAL_BLUR_P = (1.0, 0.1), (0.0, 0.2), 0.5  # global crops 1 and 2; locals

    def __init__(self, global_crops_size=224, local_crops_size=96, local_crops_number=10,
                 global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25), blur_sigma=(0.1, 2.0),
                 interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
        self.global_crops_size, self.global_crops_scale = global_crops_size, global_crops_scale
        self.local_crops_size, self.local_crops_scale = local_crops_size, local_crops_scale
        self.local_crops_number, self.interpolation, self.mean, self.std = local_crops_number, interpolation, mean, std
        self.blur_sigma, self.blur_radius = blur_sigma, math.ceil(3 * blur_sigma[1])  # taps cover 3 sigma

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) on the generator's device -> normalised float32 global crops (2*B, 3, G, G) and
        local crops (L*B, 3, l, l), view-major: rows [v*B:(v+1)*B] are view v of every image.

        sizes: int64 (B, 2) valid (height, width) of each image when images are padded canvases (ImageFolder's
        training items, image at the top left); every crop is then drawn inside its image's valid region, and
        resampled with antialiasing (resized_crops), since crops of these full-size images are often shrunk."""
        if sizes is not None:
            images = replicate_edges(images, sizes)
        x = images.float().div_(255)
        global_crops = self.views(x, self.global_crops_size, self.global_crops_scale, self.GLOBAL_BLUR_P,
                                  self.GLOBAL_SOLARIZE_P, generator, sizes)
        L, size = self.local_crops_number, self.local_crops_size
        if L == 0:
            return global_crops, x.new_empty(0, 3, size, size)
        local_crops = self.views(x, size, self.local_crops_scale, (self.LOCAL_BLUR_P,) * L, (0.0,) * L, generator,
                                 sizes)
        return global_crops, local_crops

    def views(self, x, size, scale, blur_p, solarize_p, generator, sizes=None) -> torch.Tensor:
        """len(blur_p) augmented views of every image of float x (B, 3, H, W) in [0, 1] (valid regions sizes
        (B, 2), or all of it); view v is blurred with probability blur_p[v], solarized with solarize_p[v].
        Returns normalised float (V*B, 3, size, size)."""
        B, _, H, W = x.shape
        n = len(blur_p) * B
        if sizes is not None:
            H, W = sizes[:, 0].repeat(len(blur_p)), sizes[:, 1].repeat(len(blur_p))  # (V*B,), view-major

        def per_view(probs):  # (V*B,), view-major
            return torch.cat([torch.full((B,), p, device=x.device) for p in probs])

        def jitter_factor(low, high, identity):  # a crop without jitter gets the identity factor
            return torch.where(jitter, _uniform(n, low, high, generator), identity).view(n, 1, 1, 1)

        crops = resized_crops(x, sample_crop_boxes(n, H, W, scale, generator), _uniform(n, 0, 1, generator) < 0.5,
                              size, self.interpolation, antialias=sizes is not None, sizes=sizes)
        jitter = _uniform(n, 0, 1, generator) < 0.8
        brightness, contrast = jitter_factor(0.6, 1.4, 1.0), jitter_factor(0.6, 1.4, 1.0)
        saturation, hue = jitter_factor(0.8, 1.2, 1.0), jitter_factor(-0.1, 0.1, 0.0)
        crops = crops.mul_(brightness).clamp_(0, 1)
        crops = torch.lerp(_grey(crops).mean((1, 2, 3), keepdim=True), crops, contrast).clamp_(0, 1)  # vs mean luma
        crops = torch.lerp(_grey(crops), crops, saturation).clamp_(0, 1)
        crops = shift_hue(crops, hue)
        grey = (_uniform(n, 0, 1, generator) < 0.2).view(n, 1, 1, 1)
        crops = torch.where(grey, _grey(crops).expand_as(crops), crops)
        blur = _uniform(n, 0, 1, generator) < per_view(blur_p)
        crops = gaussian_blur(crops, torch.where(blur, _uniform(n, *self.blur_sigma, generator), 0.0), self.blur_radius)
        solarize = (_uniform(n, 0, 1, generator) < per_view(solarize_p)).view(n, 1, 1, 1)
        crops = torch.where(solarize & (crops >= 128 / 255), 1 - crops, crops)  # PIL solarize: invert values >= 128
        return normalize(crops, self.mean, self.std)


# -------------------------------------------------------------------------------------------------------------- masks
class BlockMaskGenerator:
    """iBOT/BEiT block-wise masks on a g x g patch grid, for many crops at once on the generator's device
    (bytedance/ibot loader.py ImageFolderMask, microsoft/unilm beit masking_generator.py).

    Per crop: pick one entry of pred_ratio uniformly, r ~ U(mean - var, mean + var), target T = r g^2 patches.
    BEiT's generator then proposes rectangles (area ~ U(min_num_patches, T - count), aspect log-uniform in
    (min_aspect, 1/min_aspect), sides < g, random top-left) and accepts one when it covers between 1 and T - count
    new cells, until the count reaches T or 10 proposals in a row fail; so count <= T. Here every crop proposes
    once per round for a fixed number of rounds (a finished crop keeps failing), which needs no host sync;
    32 rounds match the mean ratio of the unbounded loop to 1e-4 at g = 6, 8 and 14 (measured).
    min_num_patches=None is iBOT's (g // 3)^2 (4 at g = 6..8, 16 at g = 14); BEiT's own default is 4.
    """

    def __init__(self, grid_size: int, pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2), min_aspect=0.3,
                 min_num_patches: int | None = None, rounds: int = 32):
        pred_ratio = tuple(pred_ratio) if isinstance(pred_ratio, (tuple, list)) else (pred_ratio,)
        if not isinstance(pred_ratio_var, (tuple, list)):
            pred_ratio_var = (pred_ratio_var,) * len(pred_ratio)
        pairs = list(zip(pred_ratio, pred_ratio_var))
        if len(pred_ratio_var) != len(pred_ratio) or not all(0 <= var <= mean <= 1 for mean, var in pairs):
            raise ValueError(f"need 0 <= pred_ratio_var <= pred_ratio <= 1 pairwise, got {pred_ratio}, "
                             f"{pred_ratio_var}")
        self.grid_size, self.pred_ratio, self.pred_ratio_var = grid_size, pred_ratio, tuple(pred_ratio_var)
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))
        self.min_num_patches = (grid_size // 3) ** 2 if min_num_patches is None else min_num_patches
        self.rounds = rounds

    def __call__(self, num_masks: int, generator: torch.Generator) -> torch.Tensor:
        """bool (num_masks, g*g), row-major over the patch grid, True = masked, on the generator's device."""
        return self.block_masks(self.sample_targets(num_masks, generator), generator)

    def sample_targets(self, num_masks: int, generator: torch.Generator) -> torch.Tensor:
        """float (num_masks,) target numbers of masked patches T = r g^2."""
        choice = _uniform(num_masks, 0, len(self.pred_ratio), generator).floor()
        ratio = torch.zeros(num_masks, device=generator.device)
        for k, (mean, var) in enumerate(zip(self.pred_ratio, self.pred_ratio_var)):
            ratio = torch.where(choice == k, _uniform(num_masks, mean - var, mean + var, generator), ratio)
        return ratio * self.grid_size ** 2

    def block_masks(self, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """bool (n, g*g) block masks, True = masked, with at most target (n,) cells each."""
        n, g = len(target), self.grid_size
        mask = torch.zeros(n, g, g, dtype=torch.bool, device=target.device)
        count, failures = torch.zeros(n, device=target.device), torch.zeros(n, device=target.device)
        cells = torch.arange(g, device=target.device)
        for _ in range(self.rounds):
            budget = target - count
            area = self.min_num_patches + (budget - self.min_num_patches) * _uniform(n, 0, 1, generator)
            aspect = _uniform(n, *self.log_aspect, generator).exp()
            h, w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
            top = (_uniform(n, 0, 1, generator) * (g - h + 1).clamp_min(1)).floor()
            left = (_uniform(n, 0, 1, generator) * (g - w + 1).clamp_min(1)).floor()
            rows = (cells >= top[:, None]) & (cells < (top + h)[:, None])  # (n, g)
            cols = (cells >= left[:, None]) & (cells < (left + w)[:, None])
            new = rows[:, :, None] & cols[:, None, :] & ~mask  # (n, g, g): cells this rectangle would add
            added = new.sum((1, 2))
            accept = (h < g) & (w < g) & (added > 0) & (added <= budget) & (count < target) & (failures < 10)
            mask |= new & accept.view(n, 1, 1)
            count += added * accept
            failures = torch.where(accept, 0.0, failures + 1)  # proposals failed in a row
        return mask.view(n, g * g)
