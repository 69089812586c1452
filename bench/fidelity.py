"""Image fidelity measures: PSNR and SSIM of 8-bit RGB images (random-weight models make noise
images, so quality is fidelity to a reference image of the same request)."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


def to_array(image) -> np.ndarray:
    """An RGB image (PNG bytes, PIL image or HxWx3 array) as float64 pixel values."""
    if isinstance(image, np.ndarray):
        return image.astype(np.float64)
    if isinstance(image, bytes | bytearray):
        image = PIL.Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    a, b = to_array(a), to_array(b)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def ssim(a, b) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03), averaged over the RGB channels."""
    x = torch.from_numpy(to_array(a)).permute(2, 0, 1)[:, None]  # [3, 1, H, W]
    y = torch.from_numpy(to_array(b)).permute(2, 0, 1)[:, None]
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    sigma_x = F.conv2d(x * x, window) - mu_x**2
    sigma_y = F.conv2d(y * y, window) - mu_y**2
    sigma_xy = F.conv2d(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2))
    return float(ssim_map.mean())
