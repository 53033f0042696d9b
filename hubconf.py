"""torch.hub entry points, and the export of a teacher backbone as a plain DINO/timm-layout state dict.

    model = torch.hub.load("path/to/sop", "vit_small", source="local")                  # random weights
    model = torch.hub.load("path/to/sop", "vit_small", source="local", pretrained="dino_deitsmall16_pretrain.pth")
    model = torch.hub.load("path/to/sop", "backbone", source="local", checkpoint="runs/cpu_demo/checkpoint.pth")
    python hubconf.py --checkpoint runs/cpu_demo/checkpoint.pth --out teacher_backbone.pth   # the export

The exported file holds only the backbone's tensors under DINO's / timm's names (`cls_token`, `pos_embed`,
`patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`), so
facebookresearch/dino's `vision_transformer.py` and timm's `VisionTransformer` (with `num_classes=0`) load it with
strict=True, and so does `model.build_backbone` here (with use_mask_token=False).
"""
import argparse
import os
import sys

import torch

from eval_knn import MAX_IMAGE_SIZE, load_backbone
from model import ARCHS, VisionTransformer, build_backbone

dependencies = ["torch"]


def backbone(checkpoint: str, checkpoint_key: str = "teacher", arch: str | None = None,
             patch_size: int = 16) -> VisionTransformer:
    """A ViT from a train.py checkpoint (its config rebuilds it) or a published DINO/iBOT/SOP file (give arch)."""
    return load_backbone(checkpoint, arch, patch_size, checkpoint_key=checkpoint_key)[0].eval()


def _arch(name: str):
    def entry(pretrained: str | None = None, patch_size: int = 16, img_size: int = 224,
              checkpoint_key: str = "teacher") -> VisionTransformer:
        if pretrained:
            return backbone(pretrained, checkpoint_key, name, patch_size)
        return build_backbone(name, img_size, patch_size, use_mask_token=False).eval()
    entry.__name__ = name
    entry.__doc__ = f"{name} ({ARCHS[name][0]} wide, {ARCHS[name][1]} blocks); pretrained: a state dict file."
    return entry


for _name in ARCHS:
    globals()[_name] = _arch(_name)


def export_backbone(checkpoint: str, out: str, checkpoint_key: str = "teacher", arch: str | None = None,
                    patch_size: int = 16) -> dict:
    """Write the backbone's state dict (DINO/timm names, no mask token, no head) to out; returns it."""
    vit = backbone(checkpoint, checkpoint_key, arch, patch_size)
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    tmp = out + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, out)
    return state


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", "--pretrained_weights", dest="checkpoint", required=True)
    parser.add_argument("--checkpoint_key", default="teacher", choices=("teacher", "student"))
    parser.add_argument("--arch", default=None, help=f"plain state dicts only: {', '.join(ARCHS)}")
    parser.add_argument("--patch_size", type=int, default=16, help="plain state dicts only")
    parser.add_argument("--out", required=True, help="the .pth file to write")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise SystemExit(f"error: --out {args.out}: its directory does not exist")
    if os.path.isdir(args.out):
        raise SystemExit(f"error: --out {args.out}: is a directory; valid: a file name")
    if not 0 < args.patch_size <= MAX_IMAGE_SIZE:
        raise SystemExit(f"error: --patch_size {args.patch_size}: valid: 1 to {MAX_IMAGE_SIZE}")
    state = export_backbone(args.checkpoint, args.out, args.checkpoint_key, args.arch, args.patch_size)
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f} M parameters")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
