"""Makes golden/flextok_tiny.npz: apple/ml-flextok's own FlexTok on seeded random weights.

    git -C <apple/ml-flextok, HEAD 87d00cc> archive HEAD flextok | tar -x -C /tmp/flextok
    PYTHONPATH=/work/main:/tmp/flextok /tmp/refenv/bin/python tests/golden/make_flextok.py

The model is ``flextok.flextok_wrapper.FlexTok`` (torch 2.13.0 CPU, float32, eval mode, its
FlexAttention compiled for the CPU) built with hydra's ``instantiate`` from
``official_layouts.FLEXTOK_TINY_CONFIG`` (the VAE from a local diffusers folder holding
``DIFFUSERS_VAE_TINY``, scaling factor 0.7, ``sample_posterior=False``). Its state_dict's names
and shapes are stored as ``shapes``; the values are ``official_layouts.flextok_state_dict(shapes,
0)``, written by ``official_layouts.write_safetensors`` with the config as the release stores it
(``__metadata__``: one str(dict) per part), read back with the repository's
``load_safetensors`` and loaded with ``load_state_dict`` (strict). On ``vq_images(1, 2, 32)``:
  ids            ``tokenize(images)`` -> [2, 16]
  latents        the VAE latents the encoder reads, [2, 4, 16, 16] (NCHW as the release)
  noise          N(0, 1) [2, 4, 16, 16] (numpy seed 2), fed to ``MinRFPipeline`` through its
                 ``noise_read_key``
  velocity_k{k}, velocity_null   one decoder call at t = 1 on the noise, the first k tokens
                 kept (k = 16, 3), and with every image's null condition (eval_dropout_mask)
  sample_{name}  ``decode`` from the first k tokens, the pipeline's Euler steps from that noise:
                 full (k 16, 4 steps, no guidance), cfg (k 5, 3 steps, guidance 3.0), apg (k 3,
                 4 steps, guidance 7.5, perform_norm_guidance) -> latents [2, 4, 16, 16]
  images_apg     the VAE's decode of sample_apg, [2, 3, 32, 32]
"""

import json
import os
import tempfile

import numpy as np
import torch
from diffusers.models import AutoencoderKL
from flextok.flextok_wrapper import FlexTok
from flextok.utils.checkpoint import load_safetensors
from hydra.utils import instantiate

from tests.official_layouts import (
    DIFFUSERS_VAE_TINY,
    FLEXTOK_TINY_CONFIG,
    _flextok_tiny_config,
    flextok_state_dict,
    vq_images,
    write_safetensors,
)

SAMPLES = {"full": (16, 4, 1.0, False), "cfg": (5, 3, 3.0, False), "apg": (3, 4, 7.5, True)}


def build(vae_dir: str) -> FlexTok:
    d = DIFFUSERS_VAE_TINY
    AutoencoderKL(
        block_out_channels=list(d["block_out_channels"]), layers_per_block=d["layers_per_block"],
        latent_channels=d["latent_channels"], norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        scaling_factor=0.7,
    ).save_pretrained(vae_dir)  # fmt: skip
    parts = {k: instantiate(v) for k, v in _flextok_tiny_config(vae_dir).items()}
    return FlexTok(**parts)


def decode(model, ids, k, steps, guidance, apg, noise):
    data = model._prepare_data_dict_for_detokenization([t[:, :k] for t in ids])
    data["noise"] = [torch.from_numpy(n[None]) for n in noise]
    data = model.decode(
        data, timesteps=steps, vae_image_sizes=16, guidance_scale=guidance,
        perform_norm_guidance=apg, verbose=False,
    )  # fmt: skip
    return torch.cat(data["vae_latents_reconst"]).numpy(), torch.cat(data["rgb_reconst"]).numpy()


def velocity(model, ids, k, noise, null):
    data = model._prepare_data_dict_for_detokenization([t[:, :k] for t in ids])
    data["vae_latents_noised"] = [torch.from_numpy(n[None]) for n in noise]
    data["timesteps"] = torch.ones(len(ids))
    if null:
        data["eval_dropout_mask"] = [True] * len(ids)
    return torch.cat(model.decoder(data)["vae_latents_reconst"]).numpy()


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(os.path.join(tmp, "vae")).eval()
        model.pipeline.noise_read_key = "noise"
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        path = os.path.join(tmp, "model.safetensors")
        metadata = {k: str(v) for k, v in FLEXTOK_TINY_CONFIG.items()}
        write_safetensors(path, flextok_state_dict(shapes, 0), metadata)
        tensors, config = load_safetensors(path)
        assert config == FLEXTOK_TINY_CONFIG
        model.load_state_dict(tensors, strict=True)
    images = torch.from_numpy(vq_images(1, 2, 32)).permute(0, 3, 1, 2)
    noise = np.random.default_rng(2).standard_normal((2, 4, 16, 16)).astype(np.float32)
    out = {"shapes": np.array(json.dumps(shapes)), "noise": noise}
    with torch.no_grad():
        latents = model.vae.encode({"rgb": list(images.split(1))})["vae_latents"]
        out["latents"] = torch.cat(latents).numpy()
        ids = model.tokenize(images)
        out["ids"] = torch.cat(ids).numpy().astype(np.int64)
        for k in (16, 3):
            out[f"velocity_k{k}"] = velocity(model, ids, k, noise, null=False)
        out["velocity_null"] = velocity(model, ids, 16, noise, null=True)
        for name, (k, steps, guidance, apg) in SAMPLES.items():
            out[f"sample_{name}"], images_out = decode(model, ids, k, steps, guidance, apg, noise)
            if name == "apg":
                out["images_apg"] = images_out
    np.savez_compressed(os.path.join(os.path.dirname(__file__), "flextok_tiny.npz"), **out)
    print({k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
