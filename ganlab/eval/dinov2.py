"""DINOv2 from a local weights file. torch-fidelity 0.4 builds DINOv2 only through torch.hub (code and
weights from the network; a weights path raises NotImplementedError), so ganlab rebuilds the hub
model's ViT from the official state dict (dinov2_vit*14_pretrain.pth) and keeps torch-fidelity's own
forward: resize to 224 like TF1, ImageNet normalisation, the CLS token after the final norm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.ls1, self.ls2 = nn.Module(), nn.Module()
        self.ls1.gamma, self.ls2.gamma = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.ls1.gamma * self.attn.proj(a)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoV2ViT(nn.Module):
    """The DINOv2 hub ViT (no registers, MLP blocks: s/b/l), its shape read from a state dict."""

    def __init__(self, sd: dict):
        super().__init__()
        dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros_like(sd["pos_embed"]))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(_Block(dim, dim // 64 or 1) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.load_state_dict(sd)

    def pos(self, h0: int, w0: int) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        m = int(n**0.5)
        if (h0, w0) == (m, m):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        # DINOv2's interpolate_pos_encoding: bicubic, scale (w0 + 0.1) / M, no antialias
        grid = F.interpolate(grid, scale_factor=((w0 + 0.1) / m, (h0 + 0.1) / m), mode="bicubic", antialias=False)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], 1)

    def forward(self, x):
        x = self.patch_embed.proj(x)
        h0, w0 = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + self.pos(h0, w0)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class LocalDinoV2(FeatureExtractorDinoV2):
    """torch-fidelity's DINOv2 extractor (its forward, resizing and normalisation) over DinoV2ViT."""

    weights_path: str = ""  # set on the run-time subclass

    def __init__(self, name, features_list, **kwargs):
        FeatureExtractorBase.__init__(self, name, features_list)
        self.feature_extractor_internal_dtype = torch.float32
        self.model = DinoV2ViT(torch.load(self.weights_path, map_location="cpu", weights_only=True))
        self.requires_grad_(False)
        self.eval()
