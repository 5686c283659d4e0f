"""Makes golden/flextok_vae_tiny.npz: diffusers' AutoencoderKL (FlexTok's VAE class) on seeded
random weights.

    /tmp/refenv/bin/pip install torch diffusers      # torch 2.14.1, diffusers 0.42.1
    PYTHONPATH=/work/main /tmp/refenv/bin/python tests/golden/make_flextok_vae.py

The model is ``diffusers.models.AutoencoderKL`` built as apple/ml-flextok's
``flextok/vae_wrapper.py`` builds it (its ``VAE_BASE_CFG``: DownEncoderBlock2D /
UpDecoderBlock2D, SiLU, 32 GroupNorm groups) with ``official_layouts.DIFFUSERS_VAE_TINY``'s
sizes (block widths 32, 64; 2 layers per block; 4 latent channels) and
``scaling_factor=0.7``. Its state_dict's names and shapes are stored as ``shapes``; the values
are ``official_layouts.diffusers_vae_state_dict(shapes, 0)``, written with
``official_layouts.write_safetensors`` beside a config.json and loaded back with
``AutoencoderKL.from_pretrained`` (float32, CPU, eval). Stored, on ``vq_images(3, 2, 32)``:
  mean, logvar   the posterior's moments, [2, 4, 16, 16] (NCHW)
  recon          ``decode(mean).sample``, [2, 3, 32, 32]
  scaling_factor 0.7
"""

import json
import os
import tempfile

import numpy as np
import torch
from diffusers.models import AutoencoderKL

from tests.official_layouts import (
    DIFFUSERS_VAE_TINY,
    diffusers_vae_state_dict,
    vq_images,
    write_safetensors,
)


def config() -> dict:
    d = DIFFUSERS_VAE_TINY
    levels = len(d["block_out_channels"])
    return dict(
        in_channels=3, out_channels=3, act_fn="silu", norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(d["block_out_channels"]), layers_per_block=d["layers_per_block"],
        latent_channels=d["latent_channels"], sample_size=32, scaling_factor=0.7,
    )  # fmt: skip


def main():
    torch.manual_seed(0)
    template = AutoencoderKL(**config())
    shapes = {k: list(v.shape) for k, v in template.state_dict().items()}
    state = diffusers_vae_state_dict(shapes, 0)
    with tempfile.TemporaryDirectory() as tmp:
        write_safetensors(os.path.join(tmp, "diffusion_pytorch_model.safetensors"), state)
        template.save_config(tmp)
        model = AutoencoderKL.from_pretrained(tmp).eval()
    for name, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), state[name]), name
    images = torch.from_numpy(vq_images(3, 2, 32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        posterior = model.encode(images).latent_dist
        out = {
            "shapes": np.array(json.dumps(shapes)),
            "mean": posterior.mean.numpy(),
            "logvar": posterior.logvar.numpy(),
            "recon": model.decode(posterior.mean).sample.numpy(),
            "scaling_factor": np.float32(model.config.scaling_factor),
        }
    np.savez_compressed(os.path.join(os.path.dirname(__file__), "flextok_vae_tiny.npz"), **out)
    print({k: v.shape for k, v in out.items()}, float(out["recon"].std()))


if __name__ == "__main__":
    main()
