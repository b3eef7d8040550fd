#!/usr/bin/env python3
"""Loads an `m2unet train` checkpoint into the PyTorch reference as a state_dict and compares.

The checkpoint's plain tensor names are the model's state_dict; its optimiser moments are
under `optim.m.<name>` / `optim.v.<name>` and are dropped here before a strict
`load_state_dict`. The script then runs an eval forward of seeded random patches in PyTorch
(float64) and through `m2unet forward --weights CHECKPOINT` (the Rust CPU engine reading the
same file) and prints the largest differences of the logits.

Usage: tools/check_checkpoint_torch.py CHECKPOINT [--binary target/release/m2unet] [--patches 4]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_reference as ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--binary", default="target/release/m2unet")
    ap.add_argument("--patches", type=int, default=4)
    args = ap.parse_args()
    tensors, metadata = ref.load_tensors(args.checkpoint)
    state = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    dropped = len(tensors) - len(state)
    patch = int(metadata["patch"])
    cfg = ref.infer_config(state, metadata, patch)
    model = ref.M2UNet(cfg).double()
    model.load_state_dict({k: (v.double() if v.is_floating_point() else v) for k, v in state.items()}, strict=True)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    patches = torch.rand(args.patches, cfg.in_channels, patch, patch, generator=gen)
    bag_sizes = [args.patches // 2, args.patches - args.patches // 2]
    with torch.no_grad():
        seg, cls = model(patches.double(), bag_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        ref.save_tensors(inp, {"patches": patches, "bag_sizes": torch.tensor(bag_sizes, dtype=torch.int64)})
        subprocess.run(
            [args.binary, "forward", "--weights", args.checkpoint, "--input", str(inp), "--output", str(out)],
            check=True,
        )
        rust, _ = ref.load_tensors(out)
    seg_err = (rust["seg_logits"].double() - seg).abs().max().item()
    cls_err = (rust["cls_logits"].double() - cls).abs().max().item()
    seg_scale = seg.abs().max().item()
    print(
        f"{args.checkpoint}: strict load_state_dict of {len(state)} tensors after dropping {dropped} optim.* tensors; "
        f"P={patch}, {args.patches} patches; max |Δ| seg_logits {seg_err:.3e} (max |logit| {seg_scale:.2f}), "
        f"cls_logits {cls_err:.3e}; cls logits torch {cls.tolist()}"
    )
    if seg_err > 1e-3 * max(1.0, seg_scale) or cls_err > 1e-3 * max(1.0, cls.abs().max().item()):
        sys.exit("the engines disagree")


if __name__ == "__main__":
    main()
