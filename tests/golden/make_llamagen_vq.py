"""Makes golden/llamagen_vq_tiny.npz: LlamaGen's own VQ model on seeded random weights.

    git -C <FoundationVision/LlamaGen, HEAD ce98ec4> archive HEAD tokenizer | tar -x -C /tmp/llamagen
    PYTHONPATH=/work/main:/tmp/llamagen /tmp/refenv/bin/python tests/golden/make_llamagen_vq.py

The model is LlamaGen's ``tokenizer.tokenizer_image.vq_model.VQModel`` (torch 2.14.1, CPU,
float32, eval mode) with ``ModelArgs(encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2],
z_channels=32, codebook_size=256, codebook_embed_dim=8)`` and its ``encoder`` / ``decoder``
rebuilt with ``ch=32`` (VQModel fixes ch=128; the layout is otherwise VQ-16's). Its
state_dict's names and shapes are stored as ``shapes`` (a JSON table); the values are
``official_layouts.llamagen_vq_state_dict(shapes, 0)``, loaded with ``load_state_dict``
(strict) from a file that ``official_layouts.write_torch_file`` wrote as ``{"model": ...}``
and ``torch.load(weights_only=True)`` read back. Stored, on ``vq_images(1, 2, 32)``:
  z        quant_conv's output before quantization, [2, 8, 16, 16] (NCHW as LlamaGen)
  ids      ``encode``'s min_encoding_indices, [2, 16, 16] int64
  recon    ``decode(quant)``, [2, 3, 32, 32]
  decoded  ``decode_code(ids, (2, 8, 16, 16))``, the tokens' images, [2, 3, 32, 32]
"""

import json
import os
import tempfile

import numpy as np
import torch
from tokenizer.tokenizer_image import vq_model

from tests.official_layouts import (
    LLAMAGEN_VQ_TINY,
    llamagen_vq_state_dict,
    vq_images,
    write_torch_file,
)


def build() -> vq_model.VQModel:
    d = LLAMAGEN_VQ_TINY
    mult = list(d["ch_mult"])
    args = vq_model.ModelArgs(
        encoder_ch_mult=mult, decoder_ch_mult=mult, z_channels=d["z_channels"],
        codebook_size=d["codebook_size"], codebook_embed_dim=d["codebook_dim"],
    )  # fmt: skip
    model = vq_model.VQModel(args)
    model.encoder = vq_model.Encoder(ch=d["ch"], ch_mult=mult, z_channels=d["z_channels"])
    model.decoder = vq_model.Decoder(ch=d["ch"], ch_mult=mult, z_channels=d["z_channels"])
    return model.eval()


def main():
    torch.manual_seed(0)
    model = build()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    state = llamagen_vq_state_dict(shapes, 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vq.pt")
        write_torch_file(path, {"model": state, "steps": 0})
        loaded = torch.load(path, weights_only=True)["model"]
    for name, value in state.items():
        assert np.array_equal(loaded[name].numpy(), value), name
    model.load_state_dict(loaded, strict=True)
    images = torch.from_numpy(vq_images(1, 2, 32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images))
        quant, _, (_, _, ids) = model.encode(images)
        ids = ids.reshape(2, 16, 16)
        out = {
            "shapes": np.array(json.dumps(shapes)),
            "z": z.numpy(),
            "ids": ids.numpy(),
            "recon": model.decode(quant).numpy(),
            "decoded": model.decode_code(ids.reshape(-1), (2, 8, 16, 16)).numpy(),
        }
    np.savez_compressed(os.path.join(os.path.dirname(__file__), "llamagen_vq_tiny.npz"), **out)
    print({k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
