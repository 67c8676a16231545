"""The visual encoder: an EVA-CLIP ViT, and Emu2's tokenisation of an image by mean pooling.

Why hand-written: Emu2's EVA-02-CLIP-E-plus uses post-norm blocks, `x + LN(Attn(x))`, which no
config of transformers' pre-norm CLIPVisionModel expresses, and timm's Eva (which has them) needs
torchvision, of which no CPU build exists here. The module below keeps the official parameter
names (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.q_bias,
attn.v_bias,attn.proj,norm2,mlp.fc1,mlp.fc2}`) so released weights load 1:1; with
`postnorm=False` it is the pre-norm ViT of CLIP, which tests compare against transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emu.model.config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels_BCHW).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Fused qkv projection with separate q and v biases and no k bias (official eva_vit.py)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        if config.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(config.width))
            self.v_bias = nn.Parameter(torch.zeros(config.width))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        # Call the qkv module (not F.linear on its weight): ZeRO-3 gathers a module's weights
        # when the module itself runs, so a weight read from outside it would be its empty shard.
        qkv = self.qkv(x_BND)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = qkv.reshape(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim**-0.5, as the original
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as EVA-CLIP
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.postnorm = config.postnorm
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postnorm:  # EVA-E: the branch output is normalised, the residual stream never is
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaVisionTransformer(nn.Module):
    """Patch embedding + CLS + absolute positions, then blocks; no pre-norm and no final norm, so
    the output is the last block's tokens (CLS first), as Emu2 reads them."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid ** 2 + 1, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.gradient_checkpointing = False
        # Patch positions start as 2D sin-cos (MAE, He et al. 2021, §A.1) rather than ViT's
        # N(0, 0.02): an encoder trained from scratch keeps so small a signal out of its tokens
        # (a linear probe read a pooled token's grid cell from it 20% of the time), and the LM can
        # only say where a shape is if the token it attends to carries its place, because RoPE
        # moves positions into attention scores, not into the values read (Emu2 starts from
        # EVA-CLIP, whose tokens carry their place). Released weights overwrite both.
        with torch.no_grad():
            self.pos_embed[0, 1:] = sincos_positions(config.grid, config.width)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        # The encoder's compute dtype, read from its own parameter: gathered here under ZeRO-3,
        # where a partitioned parameter's placeholder may report another dtype before its module runs.
        x = self.patch_embed(pixels_BCHW.to(self.cls_token.dtype))
        grid = pixels_BCHW.shape[-1] // self.config.patch_size
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + interpolate_positions(self.pos_embed, grid)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """(grid * grid, width) fixed 2D sin-cos embeddings, row-major: the first half of the
    channels encode the row, the second half the column (MAE's `get_2d_sincos_pos_embed` with its
    halves swapped), each as sin then cos of the index at width / 4 frequencies
    1 / 10000 ** (k / (width / 4)), k = 0 .. width / 4 - 1."""
    if width % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {width}")
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    index = torch.arange(grid, dtype=torch.float64)
    angles = index[:, None] * frequencies[None]                     # (grid, width / 4)
    axis = torch.cat((angles.sin(), angles.cos()), dim=1)           # (grid, width / 2)
    rows = axis[:, None, :].expand(grid, grid, width // 2)
    cols = axis[None, :, :].expand(grid, grid, width // 2)
    return torch.cat((rows, cols), dim=2).reshape(grid * grid, width).float()


def interpolate_positions(pos_embed_1ND: torch.Tensor, grid: int) -> torch.Tensor:
    """Position embeddings for a `grid` x `grid` patch layout: the CLS row as is, the patch rows
    resized bicubically (the standard way ViTs change resolution; Emu2 raises stage 1 from 224 to
    448 px, §2.2.2). Identity when the grid matches."""
    n = pos_embed_1ND.shape[1] - 1
    old = int(round(n ** 0.5))
    if old == grid:
        return pos_embed_1ND
    cls, patches = pos_embed_1ND[:, :1], pos_embed_1ND[:, 1:]
    D = patches.shape[-1]
    patches = patches.reshape(1, old, old, D).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.to(pos_embed_1ND.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, D)
    return torch.cat((cls, patches), dim=1)


def resize_position_embeddings(visual: EvaVisionTransformer, image_size: int) -> None:
    """Bake the positions for `image_size` into the parameter and the config (after training at a
    new resolution, so the exported model states the resolution it was trained at)."""
    import dataclasses

    grid = image_size // visual.config.patch_size
    with torch.no_grad():
        resized = interpolate_positions(visual.pos_embed.data, grid)
    visual.pos_embed = nn.Parameter(resized, requires_grad=visual.pos_embed.requires_grad)
    visual.config = dataclasses.replace(visual.config, image_size=image_size)


def pool_patches(tokens_BND: torch.Tensor, side: int) -> torch.Tensor:
    """Emu2's image tokenisation: drop CLS, lay the patch tokens on their grid, average-pool to
    side x side, read out row-major (official emu.py `encode_image`; 32x32 -> 8x8 = 64 tokens)."""
    patches = tokens_BND[:, 1:]
    B, N, D = patches.shape
    grid = int(round(N ** 0.5))
    if grid * grid != N or grid % side:
        raise ValueError(f"cannot pool a {N}-patch grid to {side}x{side}")
    stride = grid // side
    grid_BDHW = patches.transpose(1, 2).reshape(B, D, grid, grid)
    pooled = F.avg_pool2d(grid_BDHW, kernel_size=stride, stride=stride)
    return pooled.flatten(2).transpose(1, 2)


def preprocess(images, config: VisionConfig) -> torch.Tensor:
    """PIL images -> normalised pixels (B, 3, S, S): bicubic resize to the square input size, no
    crop (official chat.py), then CLIP mean/std."""
    return normalize(resize_images(images, config.image_size), config)


def resize_images(images, size: int) -> torch.Tensor:
    """PIL images -> uint8 pixels (B, 3, size, size), bicubic, no crop: the first half of
    `preprocess`. A data loader ships these (a quarter of float32's bytes to build, hold and copy
    to the GPU); EmuModel normalises uint8 pixels itself, on their device."""
    from PIL import Image

    return stack_pixels([img.convert("RGB").resize((size, size), Image.BICUBIC) for img in images])


def stack_pixels(images) -> torch.Tensor:
    """PIL images of one size -> their uint8 pixels (B, 3, H, W), not resized."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images])).permute(0, 3, 1, 2)


def resize_pixels(pixels_BCHW: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 pixels (B, 3, H, W) -> uint8 (B, 3, size, size) on their own device: the numbers
    `resize_images` makes with PIL, within 2 levels (Pillow rounds in fixed point; within 1 on
    flat shapes). Pillow's bicubic resize is separable, width first, and rounds and clamps to uint8
    between the passes (libImaging/Resample.c); torch's antialiased bicubic uses Pillow's kernel
    (a = -0.5), so two one-axis passes, each rounded, reproduce it where one 2-D call would keep
    the overshoot of the first pass (up to 20 levels off). What lets a data loader ship images at
    their stored size and leave the resize to the GPU (emu.train.lm_step)."""
    if pixels_BCHW.shape[-2:] == (size, size):
        return pixels_BCHW
    x = pixels_BCHW.float()
    for target in ((x.shape[-2], size), (size, size)):
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False).round_().clamp_(0, 255)
    return x.to(torch.uint8)


def normalize(pixels_BCHW: torch.Tensor, config: VisionConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> CLIP mean/std normalised pixels in `dtype`, computed in float32 on the
    pixels' device: the same numbers as `preprocess`, bit for bit."""
    pixels = pixels_BCHW.float() / 255.0
    mean = torch.tensor(config.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels - mean) / std).to(dtype)
