"""PyTorch reference of M²UNet (docs/model.md): golden fixtures, forward oracle for the engines, baseline bench.

Subcommands (run with --help for each):
  fixtures  write the tiny-preset golden files (float64 computation, float32 storage)
  forward   run one forward (eval or train, optional losses and gradients) on any weights,
            the same contract as the Rust `m2unet forward`
  bench     time eval forward and one training step (CPU float32, or CUDA with fp16)
  selftest  check this reference against hand values, naive loops and finite differences

The network, the losses and the optimiser follow docs/model.md exactly; the modules are
registered so that the state_dict names and order are those of src/model/params.rs.
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

IGNORE_LABEL = -1
PAPER_PARAM_COUNT = 4_015_304
GCP_MODES = ("max_minus_mean", "max", "mean")
ADAMW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
LAMBDA_SEG = 1.0
PAPER_BLOCK_COUNTS = {
    "enc1": 37_824,
    "enc2": 74_112,
    "enc3": 74_112,
    "enc4": 74_112,
    "enc5": 2_657_280,
    "mil_emb": 197_632,
    "mil_img": 49_408,
    "classifier": 258,
    "dec5": 406_080,
    "dec4": 148_032,
    "dec3": 148_032,
    "dec2": 148_032,
    "seg_head": 390,
}


class InputError(Exception):
    """Bad user input (files, shapes, options): reported as one clear line, not a traceback."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape of the network (docs/model.md, "Configuration"); defaults = the paper."""

    patch: int = 256
    in_channels: int = 1
    enc_width: int = 64
    bottleneck_width: int = 512
    emb_concepts: int = 256
    img_concepts: int = 128
    seg_classes: int = 6
    cls_classes: int = 2
    gcp: str = "max_minus_mean"

    def validate(self):
        if self.patch <= 0 or self.patch % 16 != 0:
            raise InputError(f"patch side {self.patch} is not a positive multiple of 16")
        if self.gcp not in GCP_MODES:
            raise InputError(f"unknown gcp mode {self.gcp!r} (expected one of {', '.join(GCP_MODES)})")
        for name, value in asdict(self).items():
            if name != "gcp" and value <= 0:
                raise InputError(f"model config field {name} must be positive, got {value}")
        if self.seg_classes < 2:
            raise InputError("seg_classes must be at least 2 (background and one lobe)")


PRESETS = {
    "paper": ModelConfig(),
    "tiny": ModelConfig(patch=32, enc_width=8, bottleneck_width=16, emb_concepts=16, img_concepts=8),
}


def global_contrast_pool(x, dim, mode):
    """GCP over `dim`: max − mean (the default), max, or mean. torch.max routes the max's
    gradient to one index, which is the first argmax whenever there is no tie."""
    if mode == "max_minus_mean":
        return x.max(dim=dim).values - x.mean(dim=dim)
    if mode == "max":
        return x.max(dim=dim).values
    return x.mean(dim=dim)


def upsample2x(x):
    """Bilinear ×2, align_corners=False (docs/model.md's upsample2x)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class EncoderBlock(nn.Module):
    """conv3 → BN → ReLU → conv3 → BN → ReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class DecoderBlock(nn.Module):
    """u = relu(up_bn(up_conv(upsample2x(x)))); y = two conv-BN-ReLU over concat([u, skip])."""

    def __init__(self, cin, width):
        super().__init__()
        self.up_conv = nn.Conv2d(cin, width, 3, padding=1)
        self.up_bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x, skip):
        u = F.relu(self.up_bn(self.up_conv(upsample2x(x))))
        c = torch.cat([u, skip], 1)
        c = F.relu(self.bn1(self.conv1(c)))
        return F.relu(self.bn2(self.conv2(c)))


class EmbeddingMIL(nn.Module):
    """Embedding level: instances = positions of one patch's bottleneck, bag = the patch."""

    def __init__(self, channels, concepts):
        super().__init__()
        self.concepts = nn.Linear(channels, concepts)
        self.proj = nn.Linear(concepts, concepts)
        self.bn = nn.BatchNorm1d(concepts)


class ImageMIL(nn.Module):
    """Image level: instances = the patches of one bag, bag = the CT image."""

    def __init__(self, channels, concepts):
        super().__init__()
        self.concepts = nn.Linear(channels, concepts)
        self.proj = nn.Linear(concepts, concepts)


class M2UNet(nn.Module):
    """M²UNet: shared encoder, U-Net decoder (segmentation) and a two-level MIL head (severity)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w, b = cfg.enc_width, cfg.bottleneck_width
        self.enc1 = EncoderBlock(cfg.in_channels, w)
        self.enc2 = EncoderBlock(w, w)
        self.enc3 = EncoderBlock(w, w)
        self.enc4 = EncoderBlock(w, w)
        self.enc5 = EncoderBlock(w, b)
        self.mil_emb = EmbeddingMIL(b, cfg.emb_concepts)
        self.mil_img = ImageMIL(cfg.emb_concepts, cfg.img_concepts)
        self.classifier = nn.Linear(cfg.img_concepts, cfg.cls_classes)
        self.dec5 = DecoderBlock(b, w)
        self.dec4 = DecoderBlock(w, w)
        self.dec3 = DecoderBlock(w, w)
        self.dec2 = DecoderBlock(w, w)
        self.seg_head = nn.Conv2d(w, cfg.seg_classes, 1)

    def mil_head(self, h, bag_sizes):
        """h [M, B, S, S] → cls logits [bags, cls_classes]."""
        m, b = h.shape[:2]
        scores = self.mil_emb.concepts(h.reshape(m, b, -1).transpose(1, 2)).transpose(1, 2)
        z = global_contrast_pool(scores, 2, self.cfg.gcp)
        e = F.relu(self.mil_emb.bn(self.mil_emb.proj(z)))
        bag_vectors = []
        for e_bag in torch.split(e, bag_sizes):
            g = global_contrast_pool(self.mil_img.concepts(e_bag), 0, self.cfg.gcp)
            bag_vectors.append(F.relu(self.mil_img.proj(g)))
        return self.classifier(torch.stack(bag_vectors))

    def forward(self, patches, bag_sizes):
        """patches [M, in_channels, P, P], bag_sizes (consecutive patches per bag) →
        (seg_logits [M, seg_classes, P, P], cls_logits [bags, cls_classes])."""
        check_batch(self.cfg, tuple(patches.shape), bag_sizes)
        s1 = self.enc1(patches)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        s3 = self.enc3(F.max_pool2d(s2, 2))
        s4 = self.enc4(F.max_pool2d(s3, 2))
        h = self.enc5(F.max_pool2d(s4, 2))
        cls_logits = self.mil_head(h, bag_sizes)
        d = self.dec5(h, s4)
        d = self.dec4(d, s3)
        d = self.dec3(d, s2)
        d = self.dec2(d, s1)
        return self.seg_head(d), cls_logits


def check_batch(cfg, shape, bag_sizes):
    """Rejects patch tensors and bag splits the network cannot take."""
    expected = (cfg.in_channels, cfg.patch, cfg.patch)
    if len(shape) != 4 or tuple(shape[1:]) != expected:
        raise InputError(f"patches have shape {list(shape)}, expected [M, {expected[0]}, {expected[1]}, {expected[2]}]")
    if sum(bag_sizes) != shape[0]:
        raise InputError(f"bag_sizes {list(bag_sizes)} sum to {sum(bag_sizes)}, but there are {shape[0]} patches")
    if len(bag_sizes) == 0 or min(bag_sizes) < 2:
        raise InputError(f"bag_sizes {list(bag_sizes)}: every bag needs at least 2 patches")


def count_block_params(model):
    """Learnable parameter counts per top-level block, in registration order."""
    counts = {}
    for name, p in model.named_parameters():
        block = name.split(".")[0]
        counts[block] = counts.get(block, 0) + p.numel()
    return counts


def check_paper_param_count():
    """The paper config must have Table 1's parameters (docs/model.md)."""
    counts = count_block_params(M2UNet(PRESETS["paper"]))
    total = sum(counts.values())
    assert counts == PAPER_BLOCK_COUNTS, f"paper block counts {counts} differ from docs/model.md"
    assert total == PAPER_PARAM_COUNT, f"paper config has {total} parameters, expected {PAPER_PARAM_COUNT}"
    return total


def segmentation_losses(seg_logits, seg_labels):
    """(L_ce, L_dice) of docs/model.md: CE over all classes and soft Dice over classes 1..C−1,
    both over the non-ignored pixels of the batch. With no labelled pixel both are 0."""
    classes = seg_logits.shape[1]
    valid = seg_labels != IGNORE_LABEL
    n_valid = valid.sum().clamp(min=1)
    ce = F.cross_entropy(seg_logits, seg_labels, ignore_index=IGNORE_LABEL, reduction="sum") / n_valid
    probs = torch.softmax(seg_logits, 1)
    mask = valid.unsqueeze(1).to(probs.dtype)
    onehot = F.one_hot(seg_labels.clamp(min=0), classes).permute(0, 3, 1, 2).to(probs.dtype) * mask
    p = (probs * mask)[:, 1:]
    y = onehot[:, 1:]
    inter = (p * y).sum(dim=(0, 2, 3))
    dice = (2 * inter + 1) / (p.sum(dim=(0, 2, 3)) + y.sum(dim=(0, 2, 3)) + 1)
    return ce, 1 - dice.mean()


def training_losses(seg_logits, cls_logits, seg_labels, cls_labels):
    """L = L_cls + λ_seg (L_ce + L_dice) and its parts."""
    loss_cls = F.cross_entropy(cls_logits, cls_labels)
    loss_ce, loss_dice = segmentation_losses(seg_logits, seg_labels)
    loss = loss_cls + LAMBDA_SEG * (loss_ce + loss_dice)
    return {"loss": loss, "loss_cls": loss_cls, "loss_seg_ce": loss_ce, "loss_seg_dice": loss_dice}


def check_labels(cfg, patches, bag_sizes, seg_labels, cls_labels):
    m, _, p, _ = patches.shape
    if tuple(seg_labels.shape) != (m, p, p):
        raise InputError(f"seg_labels have shape {list(seg_labels.shape)}, expected [{m}, {p}, {p}]")
    if tuple(cls_labels.shape) != (len(bag_sizes),):
        raise InputError(f"cls_labels have shape {list(cls_labels.shape)}, expected [{len(bag_sizes)}] (one per bag)")
    if int(seg_labels.min()) < IGNORE_LABEL or int(seg_labels.max()) >= cfg.seg_classes:
        raise InputError(f"seg_labels must lie in -1..{cfg.seg_classes - 1}")
    if int(cls_labels.min()) < 0 or int(cls_labels.max()) >= cfg.cls_classes:
        raise InputError(f"cls_labels must lie in 0..{cfg.cls_classes - 1}")


def bn_buffers(model):
    """Every BN buffer (running_mean, running_var, num_batches_tracked) under its state_dict name."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def run_forward(model, patches, bag_sizes, train, seg_labels=None, cls_labels=None):
    """One forward in eval or train mode; with labels (train mode) also the losses and the
    gradient of every learnable parameter. Returns named tensors in the model's dtype."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    with_grad = train and seg_labels is not None
    with torch.set_grad_enabled(with_grad):
        seg_logits, cls_logits = model(patches, bag_sizes)
        out = {"seg_logits": seg_logits.detach(), "cls_logits": cls_logits.detach()}
        if seg_labels is not None:
            losses = training_losses(seg_logits, cls_logits, seg_labels, cls_labels)
            out.update({k: v.detach() for k, v in losses.items()})
    if with_grad:
        losses["loss"].backward()
        out.update({f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters()})
    if train:
        out.update(bn_buffers(model))
    return out


def tensors_for_file(tensors):
    """Floating tensors as contiguous float32, integers as int64 (safetensors storage)."""
    stored = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        stored[name] = (t.float() if t.is_floating_point() else t.long()).contiguous().clone()
    return stored


def save_tensors(path, tensors, metadata=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors_for_file(tensors), str(path), metadata=metadata)


def load_tensors(path):
    """All tensors and the metadata of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise InputError(f"{path} is not a readable safetensors file: {e}") from e


# ---------------------------------------------------------------------------------------------
# fixtures


def make_fixture_patches(n, p):
    """n patches [n, 1, p, p] in [0.05, 0.95]: a few smooth Gaussian blobs plus noise, scaled
    per patch without clipping (no flat plateaus, hence no exact max-pool ties)."""
    yy, xx = torch.meshgrid(torch.arange(p, dtype=torch.float64), torch.arange(p, dtype=torch.float64), indexing="ij")
    img = torch.zeros(n, p, p, dtype=torch.float64)
    for m in range(n):
        for _ in range(4):
            cy, cx = (torch.rand(2, dtype=torch.float64) * p).tolist()
            sigma = 2 + float(torch.rand(1)) * p / 4
            amp = 0.3 + 0.7 * float(torch.rand(1))
            img[m] += amp * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    img += 0.05 * torch.randn(n, p, p, dtype=torch.float64)
    low, high = img.amin(dim=(1, 2), keepdim=True), img.amax(dim=(1, 2), keepdim=True)
    return (0.05 + 0.9 * (img - low) / (high - low)).unsqueeze(1).float()


def make_fixture_labels(n, p, classes, ignored_patch):
    """Label maps [n, p, p]: Voronoi regions of random seeds, one class each, ~5 % of pixels
    ignored (−1) and patch `ignored_patch` entirely ignored."""
    yy, xx = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    labels = torch.empty(n, p, p, dtype=torch.int64)
    for m in range(n):
        seeds = torch.rand(2 * classes, 2) * p
        seed_class = torch.randint(0, classes, (2 * classes,))
        d2 = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
        labels[m] = seed_class[d2.argmin(0)]
    labels[torch.rand(n, p, p) < 0.05] = IGNORE_LABEL
    labels[ignored_patch] = IGNORE_LABEL
    return labels


def randomise_batchnorm(model, patches, bag_sizes):
    """Non-trivial BN state: weight ~ U(0.5, 1.5), bias ~ U(−0.2, 0.2); running statistics
    near each BN input's true per-channel statistics (mean μ, std σ measured on `patches` in
    train mode): running_mean = μ + 0.1·σ·N(0, 1), running_var = σ²·U(0.5, 2);
    num_batches_tracked = 3."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand_like(bn.weight) + 0.5)
            bn.bias.copy_((torch.rand_like(bn.bias) - 0.5) * 0.4)
    stats = {}

    def record_input_stats(module, inputs):
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        stats[module] = (x.mean(dim=dims), x.var(dim=dims, unbiased=False))

    hooks = [bn.register_forward_pre_hook(record_input_stats) for bn in bns]
    model.train()
    with torch.no_grad():
        model(patches, bag_sizes)
    for hk in hooks:
        hk.remove()
    with torch.no_grad():
        for bn in bns:
            mean, var = stats[bn]
            bn.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn_like(mean))
            bn.running_var.copy_(var * (0.5 + 1.5 * torch.rand_like(var)))
            bn.num_batches_tracked.fill_(3)


def round_to_float32(model):
    """Rounds every floating parameter and buffer to the nearest float32 (kept in its dtype)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.float().to(t.dtype))


def write_fixtures(out_dir):
    """The tiny-preset golden files of tests/fixtures (see its README.md)."""
    out = Path(out_dir)
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = M2UNet(cfg).double()
    n, bag_sizes = 7, [3, 4]
    patches = make_fixture_patches(n, cfg.patch).double()
    seg_labels = make_fixture_labels(n, cfg.patch, cfg.seg_classes, ignored_patch=5)
    cls_labels = torch.tensor([0, 1], dtype=torch.int64)
    randomise_batchnorm(model, patches, bag_sizes)
    round_to_float32(model)
    meta = {"gcp": cfg.gcp, "patch": str(cfg.patch)}
    save_tensors(out / "tiny_weights.safetensors", model.state_dict(), meta)
    inputs = {
        "patches": patches,
        "bag_sizes": torch.tensor(bag_sizes),
        "seg_labels": seg_labels,
        "cls_labels": cls_labels,
    }
    save_tensors(out / "tiny_input.safetensors", inputs)

    evaluated = run_forward(copy.deepcopy(model), patches, bag_sizes, train=False)
    save_tensors(out / "tiny_eval.safetensors", evaluated)
    trained = run_forward(copy.deepcopy(model), patches, bag_sizes, True, seg_labels, cls_labels)
    save_tensors(out / "tiny_train.safetensors", trained)

    stepped = copy.deepcopy(model)
    optimiser = torch.optim.AdamW(stepped.parameters(), **ADAMW)
    losses = []
    for _ in range(5):
        step = run_forward(stepped, patches, bag_sizes, True, seg_labels, cls_labels)
        losses.append(step["loss"])
        optimiser.step()
    save_tensors(out / "tiny_adamw.safetensors", {"losses": torch.stack(losses), **stepped.state_dict()})
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.glob("tiny_*.safetensors"))
    print(f"tiny preset: {n_params} parameters; eval cls_logits {evaluated['cls_logits'].tolist()}")
    print(f"train loss {float(trained['loss']):.6f}; AdamW losses {[round(float(v), 6) for v in losses]}")
    print(f"wrote 5 files ({size / 1e6:.2f} MB) to {out}")


# ---------------------------------------------------------------------------------------------
# forward


def infer_config(state, metadata, patch_side):
    """Model config from tensor shapes and the gcp metadata; the patch side is the input's (the
    stored `patch` is only the side the weights were trained at, as in the engines)."""

    def dim(name, axis):
        if name not in state:
            raise InputError(f"weights lack tensor {name!r}: not an M²UNet state_dict")
        return int(state[name].shape[axis])

    cfg = ModelConfig(
        patch=patch_side,
        in_channels=dim("enc1.conv1.weight", 1),
        enc_width=dim("enc1.conv1.weight", 0),
        bottleneck_width=dim("enc5.conv1.weight", 0),
        emb_concepts=dim("mil_emb.concepts.weight", 0),
        img_concepts=dim("mil_img.concepts.weight", 0),
        seg_classes=dim("seg_head.weight", 0),
        cls_classes=dim("classifier.weight", 0),
        gcp=metadata.get("gcp", "max_minus_mean"),
    )
    cfg.validate()
    return cfg


def load_model(state, cfg, dtype):
    """An M2UNet holding `state` (every tensor must be there, with its exact shape)."""
    model = M2UNet(cfg).to(dtype)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"weights do not fit the inferred config {cfg}: {e}") from e
    return model


def forward_command(args):
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    inputs, _ = load_tensors(args.input)
    for key in ("patches", "bag_sizes"):
        if key not in inputs:
            raise InputError(f"{args.input} lacks tensor {key!r}")
    patches = inputs["patches"].to(dtype)
    bag_sizes = [int(v) for v in inputs["bag_sizes"].reshape(-1)]
    if patches.dim() != 4:
        raise InputError(f"patches have shape {list(patches.shape)}, expected [M, C, P, P]")
    state, metadata = load_tensors(args.weights)
    cfg = infer_config(state, metadata, int(patches.shape[-1]))
    model = load_model(state, cfg, dtype)
    check_batch(cfg, tuple(patches.shape), bag_sizes)
    labelled = [k in inputs for k in ("seg_labels", "cls_labels")]
    if any(labelled) and not all(labelled):
        raise InputError("give both seg_labels and cls_labels, or neither")
    seg_labels = cls_labels = None
    if all(labelled):
        seg_labels, cls_labels = inputs["seg_labels"].long(), inputs["cls_labels"].long().reshape(-1)
        check_labels(cfg, patches, bag_sizes, seg_labels, cls_labels)
    out = run_forward(model, patches, bag_sizes, args.mode == "train", seg_labels, cls_labels)
    save_tensors(args.output, out)
    loss_keys = ("loss", "loss_cls", "loss_seg_ce", "loss_seg_dice")
    summary = "".join(f", {k} {float(out[k]):.6f}" for k in loss_keys if k in out)
    batch = f"{len(bag_sizes)} bags, {patches.shape[0]} patches"
    print(f"{args.mode} forward ({args.dtype}) of {batch} → {args.output}{summary}")


# ---------------------------------------------------------------------------------------------
# bench


def forward_flops_per_patch(cfg):
    """Analytic forward FLOPs of one patch: 2·Cout·Cin·9·H·W per 3×3 conv plus 2·Cout·Cin·H·W
    for the 1×1 seg head (the MIL head, BN, pooling and upsampling are not counted)."""
    p, cin, w, b = cfg.patch, cfg.in_channels, cfg.enc_width, cfg.bottleneck_width

    def conv3(ci, co, side):
        return 2 * co * ci * 9 * side * side

    flops = conv3(cin, w, p) + conv3(w, w, p)
    for k in (1, 2, 3):
        flops += 2 * conv3(w, w, p >> k)
    flops += conv3(w, b, p >> 4) + conv3(b, b, p >> 4)
    for k, ci in ((3, b), (2, w), (1, w), (0, w)):
        flops += conv3(ci, w, p >> k) + conv3(2 * w, w, p >> k) + conv3(w, w, p >> k)
    return flops + 2 * cfg.seg_classes * w * p * p


def split_into_bags(n, bags):
    if bags < 1 or n < 2 * bags:
        raise InputError(f"{n} patches cannot form {bags} bags of at least 2 patches")
    return [n // bags + (1 if i < n % bags else 0) for i in range(bags)]


class Timer:
    """Wall-clock times of a callable in ms: perf_counter on the CPU, CUDA events on a GPU."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def bench_command(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: PyTorch sees no CUDA device here")
    if args.patch % 16 != 0 or args.patch <= 0:
        raise InputError(f"--patch {args.patch} is not a positive multiple of 16")
    if args.warmup is None:
        args.warmup = 3 if args.compile else 1
    if args.iters < 1 or args.warmup < 0:
        raise InputError("--iters must be ≥ 1 and --warmup ≥ 0")
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    cfg = replace(PRESETS[args.preset], patch=args.patch)
    bag_sizes = split_into_bags(args.patches, args.bags)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = M2UNet(cfg).to(device, memory_format=fmt)
    patches = torch.rand(args.patches, cfg.in_channels, cfg.patch, cfg.patch, device=device).to(memory_format=fmt)
    seg_labels = torch.randint(0, cfg.seg_classes, (args.patches, cfg.patch, cfg.patch), device=device)
    cls_labels = torch.randint(0, cfg.cls_classes, (len(bag_sizes),), device=device)
    timer = Timer(device)

    eval_model = copy.deepcopy(model).eval()
    eval_patches = patches
    if args.half:
        eval_model, eval_patches = eval_model.half(), patches.half()
    train_model = model.train()
    optimiser = torch.optim.AdamW(train_model.parameters(), **ADAMW)
    scaler = torch.amp.GradScaler(device.type, enabled=args.half)
    if args.compile:
        eval_model, train_model_call = torch.compile(eval_model), torch.compile(train_model)
    else:
        train_model_call = train_model

    def eval_step():
        with torch.inference_mode():
            eval_model(eval_patches, bag_sizes)

    def train_step():
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.half):
            seg_logits, cls_logits = train_model_call(patches, bag_sizes)
            loss = training_losses(seg_logits.float(), cls_logits.float(), seg_labels, cls_labels)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()

    flops = forward_flops_per_patch(cfg) * args.patches
    result = {
        "preset": args.preset,
        "config": asdict(cfg),
        "patches": args.patches,
        "bag_sizes": bag_sizes,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads,
        "precision": "fp16" if args.half else "fp32",
        "channels_last": args.channels_last,
        "compile": args.compile,
        "warmup": args.warmup,
        "iters": args.iters,
        "torch": torch.__version__,
        "forward_gflop": flops / 1e9,
        "flop_count": "3x3 convs + 1x1 seg head, forward; training step counted as 3x forward",
    }
    if device.type == "cuda":
        result["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    result["load_average_before"] = os.getloadavg()[0]
    rate_unit, rate_scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    for name, fn, step_flops in (("eval", eval_step, flops), ("train", train_step, 3 * flops)):
        for _ in range(args.warmup):
            timer(fn)
        times = [timer(fn) for _ in range(args.iters)]
        ms = statistics.median(times)
        rate = step_flops / (ms * 1e-3) / rate_scale
        result[f"{name}_ms"] = ms
        result[f"{name}_ms_per_patch"] = ms / args.patches
        result[f"{name}_{rate_unit.split('/')[0].lower()}_per_s"] = rate
        result[f"{name}_ms_all"] = times
        print(
            f"{name:5s}: {ms:10.2f} ms/call  {ms / args.patches:9.2f} ms/patch  {rate:8.2f} {rate_unit}"
            f"  (median of {args.iters})"
        )
    result["load_average_after"] = os.getloadavg()[0]
    print(
        f"{args.preset} P={cfg.patch} patches={args.patches} bags={bag_sizes} on {result['device']}, "
        f"threads={args.threads} {result['precision']} channels_last={args.channels_last} compile={args.compile}; "
        f"forward {flops / 1e9:.2f} GFLOP, torch {torch.__version__}; "
        f"1-min load average {result['load_average_before']:.2f} before, {result['load_average_after']:.2f} after"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------
# selftest


def naive_segmentation_losses(logits, labels):
    """Pixel-by-pixel numpy loops of docs/model.md's CE and soft Dice (independent of torch)."""
    logits, labels = logits.numpy(), labels.numpy()
    m, c, h, w = logits.shape
    ce_sum, n_valid = 0.0, 0
    inter, psum, ysum = np.zeros(c), np.zeros(c), np.zeros(c)
    for i in range(m):
        for y in range(h):
            for x in range(w):
                lab = labels[i, y, x]
                if lab == IGNORE_LABEL:
                    continue
                z = logits[i, :, y, x]
                lse = z.max() + math.log(np.exp(z - z.max()).sum())
                ce_sum += lse - z[lab]
                n_valid += 1
                prob = np.exp(z - lse)
                psum += prob
                ysum[lab] += 1
                inter[lab] += prob[lab]
    dice = (2 * inter[1:] + 1) / (psum[1:] + ysum[1:] + 1)
    return ce_sum / max(n_valid, 1), 1 - dice.mean()


def naive_mil_head(model, h, bag_sizes):
    """Loop version of the MIL head in eval mode (running statistics), numpy float64."""
    par = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    mode = model.cfg.gcp
    h = h.numpy()
    m, b = h.shape[:2]
    h = h.reshape(m, b, -1)

    def pool(values):
        values = np.asarray(values)
        if mode == "max_minus_mean":
            return values.max() - values.mean()
        return values.max() if mode == "max" else values.mean()

    w1, b1 = par["mil_emb.concepts.weight"], par["mil_emb.concepts.bias"]
    w2, b2 = par["mil_img.concepts.weight"], par["mil_img.concepts.bias"]
    e = np.zeros((m, w1.shape[0]))
    for i in range(m):
        z = [pool([w1[k] @ h[i, :, s] + b1[k] for s in range(h.shape[2])]) for k in range(w1.shape[0])]
        a = par["mil_emb.proj.weight"] @ np.array(z) + par["mil_emb.proj.bias"]
        a = (a - par["mil_emb.bn.running_mean"]) / np.sqrt(par["mil_emb.bn.running_var"] + 1e-5)
        e[i] = np.maximum(a * par["mil_emb.bn.weight"] + par["mil_emb.bn.bias"], 0)
    logits, start = [], 0
    for n in bag_sizes:
        g = [pool([w2[k] @ e[j] + b2[k] for j in range(start, start + n)]) for k in range(w2.shape[0])]
        v = np.maximum(par["mil_img.proj.weight"] @ np.array(g) + par["mil_img.proj.bias"], 0)
        logits.append(par["classifier.weight"] @ v + par["classifier.bias"])
        start += n
    return np.array(logits)


def selftest_command(_args):
    """Checks the reference against independent truths; exits non-zero on any failure."""
    failures = []

    def check(name, err, tol):
        ok = err <= tol
        print(f"{'ok  ' if ok else 'FAIL'} {name}: error {err:.3e} (tolerance {tol:.0e})")
        if not ok:
            failures.append(name)

    total = check_paper_param_count()
    check("paper parameter count vs 4,015,304 and model.md's block table", abs(total - PAPER_PARAM_COUNT), 0)

    up = upsample2x(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64))
    hand = torch.tensor([1, 1.25, 1.75, 2], dtype=torch.float64)
    check("bilinear x2 first row vs hand values [1, 1.25, 1.75, 2]", float((up[0, 0, 0] - hand).abs().max()), 1e-15)

    torch.manual_seed(1)
    logits = torch.randn(3, 6, 5, 7, dtype=torch.float64) * 2
    labels = torch.randint(-1, 6, (3, 5, 7))
    labels[1] = IGNORE_LABEL
    ce, dice = segmentation_losses(logits, labels)
    ce_ref, dice_ref = naive_segmentation_losses(logits, labels)
    check("seg CE vs pixel loop", abs(float(ce) - ce_ref), 1e-12)
    check("soft Dice vs pixel loop", abs(float(dice) - dice_ref), 1e-12)
    uniform_ce, _ = segmentation_losses(torch.zeros(2, 6, 4, 4, dtype=torch.float64), torch.randint(0, 6, (2, 4, 4)))
    check("seg CE of uniform logits vs ln 6", abs(float(uniform_ce) - math.log(6)), 1e-12)

    for mode in GCP_MODES:
        cfg = replace(PRESETS["tiny"], gcp=mode)
        model = M2UNet(cfg).double()
        randomise_batchnorm(model, torch.rand(5, 1, 32, 32, dtype=torch.float64), [2, 3])
        model.eval()
        h = torch.randn(5, cfg.bottleneck_width, 2, 2, dtype=torch.float64)
        with torch.no_grad():
            got = model.mil_head(h, [2, 3]).numpy()
        check(f"MIL head ({mode}) vs naive loops", float(np.abs(got - naive_mil_head(model, h, [2, 3])).max()), 1e-12)

    torch.manual_seed(2)
    model = M2UNet(PRESETS["tiny"]).double()
    patches = make_fixture_patches(5, 32).double()
    seg_labels = make_fixture_labels(5, 32, 6, ignored_patch=1)
    cls_labels = torch.tensor([1, 0])
    randomise_batchnorm(model, patches, [2, 3])
    out = run_forward(model, patches, [2, 3], True, seg_labels, cls_labels)
    params = dict(model.named_parameters())
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    slope = sum(float((out[f"grad.{n}"] * d).sum()) for n, d in direction.items())
    eps = 1e-8  # small enough that no ReLU, max-pool or GCP kink lies within the step

    def loss_at(sign):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in probe.named_parameters():
                p.add_(sign * eps * direction[n])
        return float(run_forward(probe, patches, [2, 3], True, seg_labels, cls_labels)["loss"])

    fd = (loss_at(1) - loss_at(-1)) / (2 * eps)
    check("whole-model gradient vs central finite difference (relative)", abs(fd - slope) / abs(slope), 1e-5)

    if failures:
        print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
        sys.exit(1)
    print("all checks passed")


# ---------------------------------------------------------------------------------------------
# command line


def build_parser():
    summary, details = __doc__.split("\n", 1)
    parser = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fixtures", help="write the tiny-preset golden fixtures (float64 compute, float32 files)")
    p.add_argument("--out", default="tests/fixtures", help="output folder (default: tests/fixtures)")

    p = sub.add_parser(
        "forward",
        help="one forward (and backward with labels) on given weights, like `m2unet forward`",
        description="Input keys: patches [M,C,P,P], bag_sizes [bags] (i64), optionally seg_labels [M,P,P] and "
        "cls_labels [bags] (i64). Output keys: seg_logits, cls_logits; in train mode the updated BN buffers "
        "(<module>.running_mean/running_var/num_batches_tracked); with labels in train mode also loss, loss_cls, "
        "loss_seg_ce, loss_seg_dice and grad.<name> for every learnable parameter (with labels in eval mode: the "
        "losses only). The config is inferred from the weights' shapes and their gcp/patch metadata.",
    )
    p.add_argument("--weights", required=True, help="state_dict safetensors file (PyTorch names)")
    p.add_argument("--input", required=True, help="safetensors file with patches, bag_sizes[, seg_labels, cls_labels]")
    p.add_argument("--output", required=True, help="safetensors file to write (float32 tensors)")
    p.add_argument("--mode", choices=["eval", "train"], default="eval", help="BatchNorm mode (default: eval)")
    p.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64", help="compute precision (default: float64)"
    )

    p = sub.add_parser("bench", help="time eval forward and one training step (median of --iters)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="model preset (default: paper)")
    p.add_argument("--patches", type=int, default=8, help="patches per batch (default: 8)")
    p.add_argument("--patch", type=int, default=256, help="patch side, a multiple of 16 (default: 256)")
    p.add_argument("--bags", type=int, default=1, help="bags the patches are split into (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations of each (default: 3)")
    p.add_argument("--warmup", type=int, help="untimed warm-up iterations of each (default: 1, or 3 with --compile)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument(
        "--half", action="store_true", help="fp16: model.half() for eval, autocast + GradScaler for training"
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and input")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up includes compilation)")
    p.add_argument("--json", help="write the results as JSON to this file")

    sub.add_parser("selftest", help="check the reference against hand values, naive loops and finite differences")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {
        "fixtures": lambda a: write_fixtures(a.out),
        "forward": forward_command,
        "bench": bench_command,
        "selftest": selftest_command,
    }
    try:
        check_paper_param_count()
        commands[args.command](args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
