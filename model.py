"""Vision Transformer backbone, projection head and the multi-crop wrapper (the paper's ViT-S/B/L backbones).

Shape legend used in every file of this project:
    B  images per GPU            V  views (crops) per image
    N  tokens per image (1 + P)  P  patch tokens per image
    D  transformer width         d  embedding dim after the projection head (256)
    M  SOPs (anchors) per draw   S  support embeddings per draw, S = M (k + 1)
    Q  memory size (rows of a memory bank)
    T  patch tokens sent through the head: the masked ones, padded to a per-epoch budget (PatchTokens)

Parameter names follow the DINO/timm ViT layout (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.norm1`,
`blocks.{i}.attn.qkv`, `blocks.{i}.attn.proj`, `blocks.{i}.norm2`, `blocks.{i}.mlp.fc1`, `blocks.{i}.mlp.fc2`,
`norm`), and the mask token is iBOT's `masked_embed`, so published DINO/iBOT/SOP backbones load into this model and
ours load into theirs.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = {  # name -> (width D, depth, heads), as in DINO/iBOT/SOP vision_transformer.py
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),  # the paper's largest model
}


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
    return x * mask.div_(keep)  # one pass over x (timm's drop_path)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D/H)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() with the attention weights softmax(q k^T / sqrt(D/H)) (B, H, N, N) computed explicitly, since
        scaled_dot_product_attention returns none. Evaluation only (visualize.py): it builds the N x N matrices."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D/H)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, N, N)
        x = weights @ v  # (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D)), weights  # (B, N, D), (B, H, N, N)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)), each branch with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation forward (no stochastic depth) that also returns the attention weights (B, H, N, N)."""
        y, weights = self.attn.forward_with_weights(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), weights


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution: (B, 3, H, W) -> (B, P, D) with P = (H / patch) (W / patch)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, P, D)


class VisionTransformer(nn.Module):
    """ViT backbone returning all final-normed tokens, [CLS] first.

    img_size fixes the size of the learnt position embeddings; inputs of any other size whose sides the patch size
    divides (local crops, evaluation sizes) get bicubically resized position embeddings, sampled at the exact pixel
    centres of the new grid (interpolate_offset 0) or, with interpolate_offset 0.1, as DINO/iBOT/official SOP do
    (README, deviation 14). With use_mask_token, a
    boolean mask (B, P), True = masked, replaces the masked patch embeddings by a learnt token before the position
    embeddings are added (iBOT's masked image modelling).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 use_mask_token: bool = True, interpolate_offset: float = 0.0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide img_size {img_size}")
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.grid_size, self.interpolate_offset = img_size // patch_size, interpolate_offset
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size ** 2, embed_dim))
        self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None  # iBOT's name
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth, as in DINO
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings (1, 1 + h w, D) for an h x w patch grid: patch part resized bicubically."""
        if h == w == self.grid_size:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g, D = self.grid_size, self.embed_dim
        patch_pos = patch_pos.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        if self.interpolate_offset:
            # DINO's form: a scale factor of (h + offset) / g makes interpolate sample slightly off the pixel
            # centres of the h x w grid (their guard against floor() rounding the output size down).
            scale = ((h + self.interpolate_offset) / g, (w + self.interpolate_offset) / g)
            patch_pos = F.interpolate(patch_pos.float(), scale_factor=scale, mode="bicubic", align_corners=False)
        else:
            patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, h w, D)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) images and optional (B, P) bool mask -> (B, N, D) tokens entering the first block."""
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = self.patch_embed(x)  # (B, P, D)
        if mask is not None:
            # Masked patches become the mask token before position embeddings are added (iBOT); where is exact,
            # so an all-False mask reproduces the unmasked output bit for bit.
            x = torch.where(mask.unsqueeze(-1), self.masked_embed.to(x.dtype), x)  # (B, P, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, N, D)
        return x + self.interpolate_pos_encoding(h, w)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) images, optional (B, P) bool mask (True = masked) -> (B, N, D) final-normed tokens."""
        x = self.prepare_tokens(x, mask)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def last_self_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images -> final-normed tokens (B, N, D) and the last block's attention weights (B, H, N, N),
        row 0 being [CLS]'s attention over all tokens (DINO's attention maps). Only the last block computes its
        weights explicitly; the others take the fast path."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        x, weights = self.blocks[-1].forward_with_attention(x)
        return self.norm(x), weights

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Final-normed token sequences (B, N, D) of the last n blocks, oldest first (for evaluation)."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs


class ProjectionHead(nn.Module):
    """3-layer MLP (GELU, no BatchNorm) to a d-dim bottleneck, L2-normalised, applied to every token
    (sthalles/sop models/head.py).

    There is no prototype (last) layer: the memory's support embeddings play that role (memory.py).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, normalize: bool = True):
        super().__init__()
        self.normalize = normalize  # False only for CARP's official unnormalised head (methods.CARP)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., d) unit-norm embeddings, normalised in fp32: under bf16 autocast a bf16 norm is off by up
        to 2^-8, which the SE similarities' 1 / tau (25 at tau_t = 0.04) would magnify to 0.1 in a logit."""
        z = self.mlp(x)
        return F.normalize(z.float(), dim=-1, eps=1e-6) if self.normalize else z


class NetworkOutput(NamedTuple):
    """What a MultiCropWrapper returns, view-major: rows [view 0 of all B images | view 1 | ...].

    cls ((2 + V_l) B, d): unit-norm [CLS] embeddings of every view, the 2 global views first.
    patch (T, d) or None: unit-norm embeddings of the global crops' patch tokens at patch_index (flat indices into
    the 2B x P grid; all 2B P of them without an index), None when no loss reads them.
    cls_logits ((2 + V_l) B, K), patch_logits (T, K) or None: prototype scores (iBOT, DINO, CARP only).
    """
    cls: torch.Tensor
    patch: torch.Tensor | None
    cls_logits: torch.Tensor | None = None
    patch_logits: torch.Tensor | None = None


class PatchTokens(NamedTuple):
    """The masked patch tokens of a step's global crops, the only ones a masked-patch loss reads (DINOv2 gathers
    them the same way before its head, with a static upper bound).

    index (T,): flat indices into the (2B, P) grid, every masked token first (in grid order), then unmasked ones
    up to the budget T, so shapes stay fixed; valid (T,) bool: True for the masked ones; crop (T,): the global crop
    each belongs to (index // P); masks (2B, P): the step's masks, True = masked.
    """
    index: torch.Tensor
    valid: torch.Tensor
    crop: torch.Tensor
    masks: torch.Tensor


def masked_tokens(masks: torch.Tensor, budget: int) -> PatchTokens:
    """PatchTokens of masks (2B, P) with T = budget >= masks.sum() (no host sync: the budget is known)."""
    flat = masks.flatten()  # (2B P,)
    index = torch.sort(flat.to(torch.int8), descending=True, stable=True).indices[:budget]  # (T,) masked first
    return PatchTokens(index, flat[index], index // masks.shape[1], masks)


def token_budget(epoch_masks: torch.Tensor) -> int:
    """T for an epoch's masks (steps, 2B, P): the most masked tokens of any of its steps, rounded up to a 32nd of
    2B P, so that the budget (a tensor shape under torch.compile) rarely changes from one epoch to the next."""
    steps, n, P = epoch_masks.shape
    bucket = max(n * P // 32, 1)
    most = int(epoch_masks.sum((1, 2)).max())  # one host sync per epoch
    return min(math.ceil(most / bucket) * bucket, n * P)


class MultiCropWrapper(nn.Module):
    """Backbone + projection head over all crops of a step, in one forward call (one DDP forward per backward).

    Crops of one resolution share a backbone call, as in DINO's `MultiCropWrapper` (facebookresearch/dino
    utils.py); the same class serves SOP and every baseline.
    """

    def __init__(self, backbone: VisionTransformer, head: ProjectionHead, patch_tokens: bool = True):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.patch_tokens = patch_tokens  # False: no loss reads patch embeddings, only [CLS] goes through the head

    def forward(self, global_crops: torch.Tensor, masks: torch.Tensor | None = None,
                local_crops: torch.Tensor | None = None, patch_index: torch.Tensor | None = None) -> NetworkOutput:
        """global_crops (2B, 3, G, G), masks (2B, P) bool or None, local_crops (V_l B, 3, l, l) or None,
        patch_index (T,) flat indices into the (2B, P) patch grid, or None for all of them.

        Only the patch tokens a loss or a memory reads go through the head (the head on a patch token costs a
        quarter of a ViT-S block stack's FLOPs on it, 90 % of a ViT-T's); without patch_tokens, none.
        """
        tokens = self.backbone(global_crops, masks)  # (2B, N, D)
        n = tokens.shape[0]
        if self.patch_tokens:
            patch = tokens[:, 1:].flatten(0, 1)  # (2B P, D)
            patch = patch if patch_index is None else patch[patch_index]  # (T, D)
            z = self.head(torch.cat((tokens[:, 0], patch)))  # (2B + T, d): one head call
            cls, patch = z[:n], z[n:]  # (2B, d), (T, d)
        else:
            cls, patch = self.head(tokens[:, 0]), None  # (2B, d)
        if local_crops is not None and local_crops.shape[0] > 0:
            # Local patch tokens are never used, so only their [CLS] goes through the head.
            local_cls = self.head(self.backbone(local_crops)[:, 0])  # (V_l B, d)
            cls = torch.cat((cls, local_cls))  # ((2 + V_l) B, d)
        return NetworkOutput(cls, patch)


def build_backbone(arch: str, img_size: int, patch_size: int, drop_path_rate: float = 0.0,
                   use_mask_token: bool = True, embed_dim: int = 0, depth: int = 0,
                   num_heads: int = 0, interpolate_offset: float = 0.0) -> VisionTransformer:
    """ViT from a preset name (a key of ARCHS); non-zero embed_dim/depth/num_heads override
    the preset (arch 'custom' needs all three)."""
    width, layers, heads = ARCHS.get(arch, (0, 0, 0))
    if arch != "custom" and arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join([*ARCHS, 'custom'])}")
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim or width,
                             depth=depth or layers, num_heads=num_heads or heads, drop_path_rate=drop_path_rate,
                             use_mask_token=use_mask_token, interpolate_offset=interpolate_offset)


def _init_weights(m: nn.Module) -> None:
    """Trunc-normal(0.02) Linear weights, zero biases, LayerNorm (1, 0); the patch conv keeps PyTorch's init."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
