"""Autoencoder reconstruction quality: PSNR and SSIM of ``model(images)[0]`` and a PNG grid."""

from __future__ import annotations
