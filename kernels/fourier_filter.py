"""FreeU Fourier filter (placeholder: FFT reference only; the direct-DFT kernels land next)."""

from __future__ import annotations

import torch
import torch.fft as fft


def fourier_filter_reference(x, threshold, scale):
    """FFT the ``(B, C, H, W)`` planes, scale the centred ``2*threshold`` square, invert, real part."""
    dtype = x.dtype
    xf = fft.fftshift(fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    B, C, H, W = xf.shape
    mask = torch.ones((B, C, H, W), device=x.device)
    crow, ccol = H // 2, W // 2
    mask[..., crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = scale
    xf = fft.ifftshift(xf * mask, dim=(-2, -1))
    return fft.ifftn(xf, dim=(-2, -1)).real.to(dtype)


def fourier_filter(x, threshold, scale):
    """FreeU's Fourier filter on ``(B, C, H, W)``."""
    return fourier_filter_reference(x, threshold, scale)
