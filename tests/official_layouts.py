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


# A small FlexTok in apple/ml-flextok's module layout (flextok_wrapper.FlexTok's six parts, as
# hydra configs: the form the released safetensors store in their metadata, one str(dict) per
# part). The encoder and decoder follow the release's module lists as its forks document them
# (encoder: patch embedding, sincos posemb, 1D registers, causal-last packing, FlexTransformer,
# unpacking, linear head to the FSQ dims; decoder: FSQ codes -> width, learned register
# posemb, nested dropout, null condition, noised-latent patch embedding, sincos posemb, full
# packing with per-subsequence AdaLN, time embedder, AdaLN FlexTransformer, unpacking, AdaLN
# head to latent patches), at width 128 (two 64-channel heads), depth 2, 16 registers, FSQ
# (8, 5, 5, 5), over the 16x16x4 latents of DIFFUSERS_VAE_TINY on 32x32 images (patch 2).
def _flextok_tiny_config(vae_path: str = "EPFL-VILAB/flextok_vae_tiny") -> dict:
    d, regs, channels, grid = 128, 16, 4, 8
    m = "flextok.model."
    op = lambda name: {"_target_": "hydra.utils.get_method", "path": f"{m}utils.dict_ops.{name}"}  # noqa: E731
    enc = {
        "enc_channels_to_last": {
            "_target_": m + "utils.dict_ops.PerSampleOp",
            "read_key": "vae_latents",
            "write_key": "enc_vae_latents_bhwc",
            "per_sample_op": op("channels_first_to_last"),
        },
        "enc_patch_emb": {
            "_target_": m + "preprocessors.patching.PatchEmbedder",
            "input_tensor_list_read_key": "enc_vae_latents_bhwc",
            "patches_list_write_key": "enc_patches",
            "n_patches_write_key": "enc_n_patches",
            "channels_in": channels,
            "dim": d,
            "patch_sizes": [2, 2],
            "flatten_patches": False,
        },
        "enc_posemb_module": {
            "_target_": m + "utils.posembs.PositionalEmbeddingAdder",
            "read_key": "enc_patches",
            "write_key": "enc_patches",
            "dim": d,
            "max_sizes": [grid, grid],
            "posemb_type": "sincos",
            "posemb_scaling": "absolute",
        },
        "enc_register_module": {
            "_target_": m + "preprocessors.registers.Registers1D",
            "input_tensor_list_read_key": "enc_patches",
            "register_sizes_read_write_key": "register_sizes",
            "registers_write_key": "enc_registers",
            "dim": d,
            "n_min": regs,
            "n_max": regs,
            "size_sampling_mode": "uniform",
            "ordering_mode": "nested",
        },
        "enc_seq_packer": {
            "_target_": m + "preprocessors.flex_seq_packing.BlockWiseSequencePacker",
            "input_list_read_keys": ["enc_patches", "enc_registers"],
            "packed_seq_write_key": "enc_packed_seq",
            "block_mask_write_key": "enc_block_mask",
            "inner_packed_shapes_write_key": "enc_ps_inner",
            "outer_packed_shapes_write_key": "enc_ps_outer",
            "mask_mode": "causal_last",
            "pad_to_multiple": 128,
            "compile_block_mask": False,
        },
        "enc_transformer": {
            "_target_": m + "trunks.transformers.FlexTransformer",
            "input_seq_read_key": "enc_packed_seq",
            "output_seq_write_key": "enc_packed_seq",
            "dim": d,
            "depth": 2,
            "block_mask_read_key": "enc_block_mask",
        },
        "enc_unpacker": {
            "_target_": m + "postprocessors.seq_unpacking.SequenceUnpacker",
            "packed_seq_read_key": "enc_packed_seq",
            "inner_seq_write_keys": ["enc_patches", "enc_registers"],
            "inner_packed_shapes_read_key": "enc_ps_inner",
            "outer_packed_shapes_read_key": "enc_ps_outer",
        },
        "enc_to_latents": {
            "_target_": m + "postprocessors.heads.LinearHead",
            "read_key": "enc_registers",
            "write_key": "enc_registers",
            "dim": d,
            "dim_out": 4,
            "use_mup_readout": False,
            "weight_init_style": "zero",
        },
    }
    dec = {
        "dec_from_latents": {"_target_": m + "preprocessors.linear.LinearLayer", "read_key": "quants", "write_key": "dec_quants", "dim_in": 4, "dim": d},
        "dec_registers_posemb_module": {"_target_": m + "utils.posembs.PositionalEmbeddingAdder", "read_key": "dec_quants", "write_key": "dec_quants", "dim": d, "max_sizes": [regs], "posemb_type": "learnable_sum", "posemb_scaling": "absolute"},
        "dec_nested_dropout": {"_target_": m + "preprocessors.token_dropout.MaskedNestedDropout", "read_write_key": "dec_quants", "dim": d, "eval_keep_k_read_key": "eval_keep_k", "train_keep_k_write_key": "train_keep_k", "size_sampling_mode": "uniform"},
        "dec_latent_dropout": {"_target_": m + "preprocessors.nullcond.LearnedNullCond", "read_write_key": "dec_quants", "dim": d, "dropout_prob": 0.2},
        "dec_noise_channels_to_last": {"_target_": m + "utils.dict_ops.PerSampleOp", "read_key": "vae_latents_noised", "write_key": "dec_noised_bhwc", "per_sample_op": op("channels_first_to_last")},
        "dec_noise_patch_emb": {"_target_": m + "preprocessors.patching.PatchEmbedder", "input_tensor_list_read_key": "dec_noised_bhwc", "patches_list_write_key": "dec_patches", "n_patches_write_key": "dec_n_patches", "channels_in": channels, "dim": d, "patch_sizes": [2, 2], "flatten_patches": False},
        "dec_patches_posemb_module": {"_target_": m + "utils.posembs.PositionalEmbeddingAdder", "read_key": "dec_patches", "write_key": "dec_patches", "dim": d, "max_sizes": [grid, grid], "posemb_type": "sincos", "posemb_scaling": "absolute"},
        "dec_seq_packer": {"_target_": m + "preprocessors.flex_seq_packing.BlockWiseSequencePacker", "input_list_read_keys": ["dec_patches", "dec_quants"], "packed_seq_write_key": "dec_packed_seq", "block_mask_write_key": "dec_block_mask", "inner_packed_shapes_write_key": "dec_ps_inner", "outer_packed_shapes_write_key": "dec_ps_outer", "mask_mode": "full", "pad_to_multiple": 128, "emb_packing_fn_write_key": "dec_emb_packing_fn", "per_subseq_embs": True, "compile_block_mask": False},
        "dec_time_embedder": {"_target_": m + "preprocessors.time_embedding.TimestepEmbedder", "timesteps_read_key": "timesteps", "time_embedding_write_key": "dec_temb", "dim": d, "max_timestep": 1.0},
        "dec_transformer": {"_target_": m + "trunks.transformers.FlexTransformer", "input_seq_read_key": "dec_packed_seq", "output_seq_write_key": "dec_packed_seq", "dim": d, "depth": 2, "block_mask_read_key": "dec_block_mask", "adaLN_emb_read_key": "dec_temb", "adaLN_packing_fn_read_key": "dec_emb_packing_fn", "adaLN_expansion": 2},
        "dec_unpacker": {"_target_": m + "postprocessors.seq_unpacking.SequenceUnpacker", "packed_seq_read_key": "dec_packed_seq", "inner_seq_write_keys": ["dec_patches", "dec_quants"], "inner_packed_shapes_read_key": "dec_ps_inner", "outer_packed_shapes_read_key": "dec_ps_outer"},
        "dec_to_patches": {"_target_": m + "postprocessors.heads.ToPatchesLinearHead", "read_key": "dec_patches", "write_key": "vae_latents_reconst_bhwc", "dim": d, "channels_out": channels, "patch_sizes": [2, 2], "use_mup_readout": False, "adaLN_emb_read_key": "dec_temb"},
        "dec_channels_to_first": {"_target_": m + "utils.dict_ops.PerSampleOp", "read_key": "vae_latents_reconst_bhwc", "write_key": "vae_latents_reconst", "per_sample_op": op("channels_last_to_first")},
    }  # fmt: skip

    def wrapper(modules: dict) -> dict:
        return {
            "_target_": m + "utils.wrappers.SequentialModuleDictWrapper",
            "module_dict": modules,
        }

    return {
        "vae": {"_target_": "flextok.vae_wrapper.StableDiffusionVAE", "images_read_key": "rgb", "vae_latents_read_key": "vae_latents_reconst", "vae_latents_write_key": "vae_latents", "images_reconst_write_key": "rgb_reconst", "latent_channels": channels, "scaling_factor": 0.7, "hf_hub_path": vae_path, "sample_posterior": False, "frozen": True},
        "encoder": wrapper(enc),
        "decoder": wrapper(dec),
        "regularizer": {"_target_": "flextok.regularizers.quantize_fsq.FSQ", "latents_read_key": "enc_registers", "quants_write_key": "quants", "tokens_write_key": "tokens", "levels": [8, 5, 5, 5]},
        "flow_matching_noise_module": {"_target_": "flextok.flow_matching.noise_modules.MinRFNoiseModule", "clean_images_read_key": "vae_latents", "noised_images_write_key": "vae_latents_noised", "timesteps_write_key": "timesteps", "sigmas_write_key": "sigmas"},
        "pipeline": {"_target_": "flextok.flow_matching.pipelines.MinRFPipeline", "_partial_": True, "target_sizes_read_key": "vae_latent_sizes", "latents_read_key": "quants", "timesteps_read_key": "timesteps", "noised_images_read_key": "vae_latents_noised", "reconst_write_key": "vae_latents_reconst", "out_channels": channels},
    }  # fmt: skip


FLEXTOK_TINY_CONFIG = _flextok_tiny_config()


def flextok_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    """Random FlexTok weights for a {name: shape} table (the golden file's): the VAE's
    (``vae.vae.*``) as ``diffusers_vae_state_dict``; Linear weights scaled 1/sqrt(fan_in)
    (AdaLN maps 0.3x; the zero-initialised ones random too, so every path matters); biases
    small; everything else unit normal: registers, mask and null tokens, the learned posemb,
    and the stored sincos posembs too (so a converter must carry the file's values)."""
    rng = np.random.default_rng(seed)
    vae = {k[len("vae.vae.") :]: v for k, v in shapes.items() if k.startswith("vae.vae.")}
    out = {f"vae.vae.{k}": v for k, v in diffusers_vae_state_dict(vae, seed).items()}
    for name in sorted(shapes):
        if name.startswith("vae.vae."):
            continue
        shape = tuple(shapes[name])
        if len(shape) == 2 and name.endswith("weight"):
            scale = 0.3 if "adaLN_modulation" in name else 1.0
            out[name] = (scale * rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        elif name.endswith("bias"):
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def write_flextok_release(path: str, seed: int = 0) -> str:
    """A random-weight FlexTok release file (FLEXTOK_TINY_CONFIG, the layout in
    golden/flextok_tiny.npz) at ``path``, for the official-weights notebook and tests."""
    import json
    import os

    golden = os.path.join(os.path.dirname(__file__), "golden", "flextok_tiny.npz")
    shapes = json.loads(str(np.load(golden)["shapes"]))
    metadata = {k: str(v) for k, v in FLEXTOK_TINY_CONFIG.items()}
    write_safetensors(path, flextok_state_dict(shapes, seed), metadata)
    return path
