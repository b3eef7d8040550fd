"""The paper network as a compact PyTorch module for timing (tools/gpu_check.sh): the layer
layout of docs/model.md, bags of 8 patches, GCP = max - mean; and a CUDA-event timer."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def timed(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def conv(i, o):
    return nn.Conv2d(i, o, 3, padding=1)

class Enc(nn.Module):
    def __init__(s, i, o):
        super().__init__()
        s.conv1, s.bn1, s.conv2, s.bn2 = conv(i, o), nn.BatchNorm2d(o), conv(o, o), nn.BatchNorm2d(o)
    def forward(s, x):
        return F.relu(s.bn2(s.conv2(F.relu(s.bn1(s.conv1(x))))))

class Dec(nn.Module):
    def __init__(s, i, w):
        super().__init__()
        s.up_conv, s.up_bn = conv(i, w), nn.BatchNorm2d(w)
        s.conv1, s.bn1, s.conv2, s.bn2 = conv(2 * w, w), nn.BatchNorm2d(w), conv(w, w), nn.BatchNorm2d(w)
    def forward(s, x, skip):
        u = F.relu(s.up_bn(s.up_conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))))
        c = torch.cat([u, skip], 1)
        return F.relu(s.bn2(s.conv2(F.relu(s.bn1(s.conv1(c))))))

class M2UNet(nn.Module):
    # docs/model.md, paper preset; bags of 8 patches, GCP = max - mean.
    def __init__(s, W=64, B=512, K1=256, K2=128):
        super().__init__()
        s.enc = nn.ModuleList([Enc(1, W), Enc(W, W), Enc(W, W), Enc(W, W), Enc(W, B)])
        s.dec = nn.ModuleList([Dec(B, W), Dec(W, W), Dec(W, W), Dec(W, W)])
        s.seg_head = nn.Conv2d(W, 6, 1)
        s.emb_concepts, s.emb_proj, s.emb_bn = nn.Linear(B, K1), nn.Linear(K1, K1), nn.BatchNorm1d(K1)
        s.img_concepts, s.img_proj, s.classifier = nn.Linear(K1, K2), nn.Linear(K2, K2), nn.Linear(K2, 2)
    def forward(s, x):
        skips = []
        for i, e in enumerate(s.enc):
            x = e(x)
            if i < 4:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        h = x
        for d in s.dec:
            x = d(x, skips.pop())
        seg = s.seg_head(x)
        sc = s.emb_concepts(h.flatten(2).transpose(1, 2))
        z = sc.amax(1) - sc.mean(1)
        e = F.relu(s.emb_bn(s.emb_proj(z)))
        t = s.img_concepts(e).view(-1, 8, s.img_concepts.out_features)
        g = t.amax(1) - t.mean(1)
        return seg, s.classifier(F.relu(s.img_proj(g)))
