"""Every loss of the VQ-VAE's training: squared reconstruction error and the quantizer's VQ loss under one
reduction (means over elements, or the seed's per-image sums), the LPIPS perceptual term, the hinge losses of the
patch discriminator (models/discriminator.py) and VQGAN's adaptive weight of the adversarial term."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from common.distributed import DistContext
from models.vqvae import VQOutput

LPIPS_PACKAGE = "lpips"  # pip install lpips==0.1.4: its linear-layer weights come inside the wheel
LPIPS_BACKBONE_FILE = "vgg16-397923af.pth"  # torchvision's VGG16 IMAGENET1K_V1, which lpips loads from torch's hub cache
ADAPTIVE_WEIGHT_MAX = 1e4  # VQGAN's clamp of the adaptive adversarial weight


def lpips_problem() -> str | None:
    """Why LPIPS cannot run from local files (nothing is ever downloaded at run time), or None when it can."""
    spec = importlib.util.find_spec(LPIPS_PACKAGE)
    if spec is None:
        return (f"the perceptual loss needs the '{LPIPS_PACKAGE}' package, which is not installed: "
                f"pip install lpips==0.1.4 (its LPIPS layers come with it; VGG16 weights, see below, too)")
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILE
    if not backbone.is_file():
        return (f"LPIPS's VGG16 backbone weights {backbone} are missing, and are not downloaded at run time; on a "
                f"machine with network run python -c \"import torchvision; torchvision.models.vgg16(weights="
                f"'IMAGENET1K_V1')\" and copy ~/.cache/torch/hub/checkpoints/{LPIPS_BACKBONE_FILE} to {backbone}")
    return None


def load_lpips(device: torch.device) -> torch.nn.Module:
    """LPIPS (VGG) from the local files lpips_problem checked, frozen, in eval mode."""
    import lpips  # optional: only runs with perceptual_weight > 0 need it

    net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    net.requires_grad_(False)
    return net


def reduction_scale(reduction: str, elements: int) -> float:
    """Factor turning a mean over an image's `elements` into the loss_reduction's term: 1 (mean) or elements (sum)."""
    return float(elements) if reduction == "sum" else 1.0


def recon_loss(rec: torch.Tensor, img: torch.Tensor, reduction: str) -> torch.Tensor:
    """Squared error of the reconstruction, averaged over the batch: per image the mean over its 3*H*W pixel
    values (mean), or their sum (sum, the seed's SSE)."""
    return F.mse_loss(rec.float(), img) * reduction_scale(reduction, img[0].numel())


def loss_terms(output: VQOutput, img: torch.Tensor, reduction: str, lpips_net: torch.nn.Module | None,
               perceptual_weight: float, latent_elements: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruction, VQ and weighted perceptual terms under one reduction. The quantizer's VQ loss is a mean over
    the B*z*h*w latent elements (and over scales); "sum" multiplies it by the z*h*w elements of one image, as the
    reconstruction's mean by its 3*H*W pixel values and the LPIPS (a mean over positions) by the same 3*H*W, so
    each reduction weighs beta and perceptual_weight the same way against its reconstruction term."""
    rec = recon_loss(output.rec, img, reduction)
    vq = output.vq_loss.float() * reduction_scale(reduction, latent_elements)
    perceptual = rec.new_zeros(())
    if lpips_net is not None and perceptual_weight > 0:
        perceptual = (perceptual_weight * lpips_net(output.rec.float(), img).mean()
                      * reduction_scale(reduction, img[0].numel()))
    return rec, vq, perceptual


def discriminator_input(img: torch.Tensor, in_channels: int) -> torch.Tensor:
    """What the discriminator sees: the grey channel for a grey model (as the encoder), else RGB."""
    return img.mean(1, keepdim=True) if in_channels == 1 else img


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: real patches pushed above +1, fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: raise the discriminator's logits of the reconstructions."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    dist: DistContext) -> torch.Tensor:
    """VQGAN's lambda = ||grad of the reconstruction loss|| / (||grad of the GAN loss|| + 1e-4) at the decoder's last
    layer, clamped to [0, 1e4]: the adversarial gradient reaching the decoder is as large as the reconstruction's,
    whatever the loss reduction. Both gradients are averaged over processes first (a small tensor), so lambda is
    that of the global batch, as one process would compute it."""
    grads = torch.stack([torch.autograd.grad(loss, last_layer, retain_graph=True)[0] for loss in (rec_loss, gan_loss)])
    rec_grad, gan_grad = dist.all_reduce_sum(grads.detach()) / dist.world_size
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, ADAPTIVE_WEIGHT_MAX)
