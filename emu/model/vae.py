"""Training objective of the visual decoder's VAE, for a decoder built without a pretrained one.

Emu2 decodes through SDXL's VAE, pretrained and frozen (§2.2.3). A decoder built from scratch
(no `decoder.init`) has a random VAE, and no UNet can reconstruct anything through it: the
random decoder maps every latent to noise. So the decoder stage first trains the VAE on the same
images, as latent diffusion trains its autoencoder before the diffusion model (Rombach et al.
2022, LDM §3.1: "perceptual compression" first, then the UNet on the frozen autoencoder's
latents), and only then the UNet.

The loss is LDM's autoencoder loss without the perceptual and adversarial terms (no pretrained
LPIPS network is available offline, and the flat-coloured synthetic scenes need neither): an L1
reconstruction of a posterior sample plus a KL term to the unit Gaussian, weighted 1e-6 as in
LDM's `kl_weight` (both summed over elements per sample as LDM does, here divided by the same
pixel count so the learning rate keeps its usual scale).

After training, the latents are rescaled to about unit variance (LDM §4.3.2 and App. G:
"we rescale the latents by ... 1/σ", the std of the first batch's latent elements), which
is what SDXL's `scaling_factor` (0.13025) does for its own VAE: the diffusion noise schedule
assumes unit-variance data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from torch import nn


@dataclass
class VAELoss:
    loss: torch.Tensor            # scalar: reconstruction + kl_weight * kl
    reconstruction: torch.Tensor  # scalar: mean |x - decode(z)| over pixels, z ~ q(z|x)
    kl: torch.Tensor              # scalar: KL(q(z|x) || N(0, I)) summed per sample, per pixel element


class VAEObjective(nn.Module):
    """Wraps the decoder's `AutoencoderKL` so that calling it (DeepSpeed calls the module) returns
    the VAE loss of a batch of (B, 3, H, W) pixels in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float = 1e-6):
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(self, pixels_BCHW: torch.Tensor, generator: torch.Generator | None = None) -> VAELoss:
        dtype = next(self.vae.parameters()).dtype
        pixels = pixels_BCHW.to(dtype)
        posterior = self.vae.encode(pixels).latent_dist
        # A posterior draw from `generator`, on the generator's device (as emu.model.decoder draws),
        # so CPU and GPU runs of one seed decode the same latents.
        where = generator.device if generator is not None else pixels.device
        eps = torch.randn(posterior.mean.shape, generator=generator, device=where, dtype=torch.float32)
        latents = posterior.mean + posterior.std * eps.to(pixels.device, posterior.mean.dtype)
        decoded = self.vae.decode(latents).sample
        reconstruction = (decoded.float() - pixels.float()).abs().mean()
        kl = posterior.kl().float().sum() / pixels.numel()
        return VAELoss(loss=reconstruction + self.kl_weight * kl, reconstruction=reconstruction, kl=kl)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, pixels_BCHW: torch.Tensor) -> float:
    """1 / std of the posterior means of `pixels` (LDM §4.3.2): multiplying the latents by it
    gives them about unit variance, what `scaling_factor` means in diffusers."""
    dtype = next(vae.parameters()).dtype
    latents = vae.encode(pixels_BCHW.to(dtype)).latent_dist.mode().float()
    std = float(latents.std())
    if not std > 0:
        raise ValueError("the VAE maps every image to the same latent (std 0); it has not learnt to encode")
    return 1.0 / std
