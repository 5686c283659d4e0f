"""Seeded random weights in released checkpoints' layouts (names, shapes, dtypes), for the
converters' tests and for making their golden files with the reference implementations."""

from __future__ import annotations

import numpy as np

# A small big_vision FlexiViT: 24 px RGB, 8x8 stored kernel, 3x3 stored posemb grid.
FLEXIVIT_TINY = dict(width=32, depth=2, heads=2, mlp=64, kernel=8, grid=3, channels=3, classes=5)


def flexivit_arrays(seed: int = 0, dims: dict = FLEXIVIT_TINY) -> dict[str, np.ndarray]:
    """{big_vision name: float32 array} of a FlexiViT (pool "tok", unscanned blocks); every
    value random (the head too, which big_vision initialises at zero)."""
    rng = np.random.default_rng(seed)
    d, h, m = dims["width"], dims["heads"], dims["mlp"]
    dh = d // h

    def normal(*shape, scale=None):
        scale = scale if scale is not None else 1 / np.sqrt(shape[0])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {
        "embedding/kernel": normal(dims["kernel"], dims["kernel"], dims["channels"], d, scale=0.05),
        "embedding/bias": normal(d, scale=0.1),
        "pos_embedding": normal(1, dims["grid"] ** 2, d, scale=0.5),
        "cls": normal(1, 1, d, scale=0.5),
        "Transformer/encoder_norm/scale": 1 + normal(d, scale=0.1),
        "Transformer/encoder_norm/bias": normal(d, scale=0.1),
        "head/kernel": normal(d, dims["classes"]),
        "head/bias": normal(dims["classes"], scale=0.1),
    }
    for i in range(dims["depth"]):
        b = f"Transformer/encoderblock_{i}/"
        for n in ("LayerNorm_0", "LayerNorm_1"):
            out[b + n + "/scale"] = 1 + normal(d, scale=0.1)
            out[b + n + "/bias"] = normal(d, scale=0.1)
        a = b + "MultiHeadDotProductAttention_0/"
        for n in ("query", "key", "value"):
            out[a + n + "/kernel"] = normal(d, h, dh)
            out[a + n + "/bias"] = normal(h, dh, scale=0.1)
        out[a + "out/kernel"] = normal(h, dh, d, scale=1 / np.sqrt(d))
        out[a + "out/bias"] = normal(d, scale=0.1)
        out[b + "MlpBlock_0/Dense_0/kernel"] = normal(d, m)
        out[b + "MlpBlock_0/Dense_0/bias"] = normal(m, scale=0.1)
        out[b + "MlpBlock_0/Dense_1/kernel"] = normal(m, d)
        out[b + "MlpBlock_0/Dense_1/bias"] = normal(d, scale=0.1)
    return out


def flexivit_images(seed: int = 1, n: int = 2, size: int = 24) -> np.ndarray:
    """float32 [n, size, size, 3] in [-1, 1] (big_vision's value_range)."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def inception_state_dict(
    shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random pytorch-fid Inception-v3 weights for a {name: shape} table (the golden file's):
    He-scaled convolutions, batch norms near identity, so activations stay O(1) through the
    network."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if name.endswith("num_batches_tracked"):
            out[name] = np.zeros(shape, np.int64)
        elif name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            out[name] = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name.endswith("bn.weight"):
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name == "fc.weight":
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        else:  # biases, running means
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def fid_images(seed: int, n: int, size: int) -> np.ndarray:
    """float32 [n, size, size, 3] in [0, 1]: smooth random colour fields plus noise, a
    distribution the seed shifts."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, 4, 4, 3))
    up = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
    return np.clip(up + 0.1 * rng.standard_normal(up.shape), 0, 1).astype(np.float32)


# A small LlamaGen VQ (LlamaGen's Encoder/Decoder with ch=32, ch_mult (1, 2), 2 ResBlocks,
# z 32, 256 codes of 8 dims): 32x32 RGB -> 16x16 codes.
LLAMAGEN_VQ_TINY = dict(ch=32, ch_mult=(1, 2), z_channels=32, codebook_size=256, codebook_dim=8)


def llamagen_vq_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """Random LlamaGen VQ weights for a {name: shape} table (the golden file's): convolutions
    scaled 1/sqrt(fan_in), GroupNorms near identity, small biases, a unit-normal codebook,
    the ``codebook_used`` buffer as LlamaGen registers it (zeros)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if name == "quantize.codebook_used":
            out[name] = np.zeros(shape, np.float32)
        elif name == "quantize.embedding.weight":
            out[name] = rng.standard_normal(shape).astype(np.float32)
        elif len(shape) == 4:
            fan_in = int(np.prod(shape[1:]))
            out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        elif name.endswith("weight"):  # GroupNorm scales
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def vq_images(seed: int = 1, n: int = 2, size: int = 32) -> np.ndarray:
    """float32 [n, size, size, 3] in [-1, 1]: smooth colour fields plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (n, 4, 4, 3))
    up = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
    return np.clip(up + 0.2 * rng.standard_normal(up.shape), -1, 1).astype(np.float32)


def write_torch_file(path: str, obj) -> None:
    """``torch.save``'s zip format without torch: ``obj`` nests dicts (saved as
    OrderedDicts), strings, ints and float32 numpy arrays (saved as contiguous CPU tensors,
    one storage each). golden/make_llamagen_vq.py checks that torch.load reads it back."""
    import struct
    import zipfile

    storages: list[np.ndarray] = []

    def text(s: str) -> bytes:
        data = s.encode()
        return b"X" + struct.pack("<I", len(data)) + data

    def integer(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    def ordered_dict() -> bytes:
        return b"ccollections\nOrderedDict\n)R"

    def value(v) -> bytes:
        if isinstance(v, dict):
            items = b"".join(text(str(k)) + value(x) for k, x in v.items())
            return ordered_dict() + b"(" + items + b"u"
        if isinstance(v, str):
            return text(v)
        if isinstance(v, int):
            return integer(v)
        a = np.ascontiguousarray(v, np.float32)
        key = str(len(storages))
        storages.append(a)
        strides = [int(np.prod(a.shape[i + 1 :])) for i in range(a.ndim)]
        storage = b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text(key) + text("cpu")
        storage += integer(a.size) + b"tQ"
        shape = b"(" + b"".join(integer(s) for s in a.shape) + b"t"
        stride = b"(" + b"".join(integer(s) for s in strides) + b"t"
        args = storage + integer(0) + shape + stride + b"\x89" + ordered_dict()
        return b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"

    pickled = b"\x80\x02" + value(obj) + b"."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        for i, a in enumerate(storages):
            archive.writestr(f"archive/data/{i}", a.tobytes())
        archive.writestr("archive/version", "3\n")


# A small FlexTok-layout VAE (diffusers AutoencoderKL with block widths 32, 64, 2 ResBlocks,
# 4 latent channels): 32x32 RGB -> 16x16x4 latents.
DIFFUSERS_VAE_TINY = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4)


def diffusers_vae_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """Random AutoencoderKL weights for a {name: shape} table (the golden file's): weights
    scaled 1/sqrt(fan_in), GroupNorms near identity, small biases."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        elif "norm" in name and name.endswith("weight"):
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_safetensors(path: str, arrays: dict[str, np.ndarray], metadata=None) -> None:
    """The .safetensors format: little-endian u64 header length, the JSON header, the bytes
    (float32 tensors here). golden/make_flextok_vae.py checks that diffusers reads it."""
    import json
    import struct

    header, offset, chunks = {}, 0, []
    for name, array in arrays.items():
        data = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


# A small LlamaGen / NAR GPT (their gpt.py ModelArgs with dim 128, 2 layers, 2 heads of 64
# channels as in every release, a 4x4 token grid of 64 codes, 10 classes); NAR's copy adds
# one block (layers.2) and the medusa head.
GPT_TINY = dict(dim=128, n_layer=2, n_head=2, vocab_size=64, num_classes=10, grid=4)


def gpt_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """Random LlamaGen / NAR GPT weights for a {name: shape} table (the golden file's):
    Linear weights scaled 1/sqrt(fan_in) (the output heads too, which the releases
    initialise at zero), RMSNorm scales near 1, unit-normal embeddings."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if "embedding" in name:
            out[name] = rng.standard_normal(shape).astype(np.float32)
        elif len(shape) == 2:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        else:
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def gpt_inputs(seed: int = 1, batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 [batch] in 0..num_classes - 1, token grids int64 [batch, grid * grid])."""
    rng = np.random.default_rng(seed)
    d = GPT_TINY
    labels = rng.integers(0, d["num_classes"], batch)
    return labels, rng.integers(0, d["vocab_size"], (batch, d["grid"] ** 2))
