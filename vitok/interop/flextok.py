"""FlexTok's released tokenizers (EPFL-VILAB/flextok_d12_d12_in1k, _d18_d18_in1k, _d18_d28_in1k,
_d18_d28_dfn: one ``model.safetensors`` each) -> vitok's ``flextok`` with its frozen VAE.

apple/ml-flextok builds the model with hydra's ``instantiate`` from a config the safetensors
carry in their ``__metadata__``: one ``str(dict)`` per part of ``flextok_wrapper.FlexTok``
(vae, encoder, decoder, regularizer, flow_matching_noise_module, pipeline). The converter reads
that config, checks that every module is one it maps (anything else is refused by name) and
takes every size from it and from the tensors:

  vae        StableDiffusionVAE: a diffusers AutoencoderKL under ``vae.vae.*`` (written as its
             own run, ``DIR/vae``, the frozen latent space) and its ``scaling_factor``
  encoder    PatchEmbedder (p x p latent patches, (row, column, channel) order) + the stored
             sincos posemb + Registers1D (nested) -> BlockWiseSequencePacker [patches;
             registers], mask "causal_last" -> FlexTransformer -> LinearHead (norm, then the
             projection to the FSQ dims)
  regularizer  FSQ(levels): Mentzer et al.'s bound (``fsq_bound="release"``)
  decoder    LinearLayer (FSQ dims -> width) + learned register posemb, then MaskedNestedDropout
             (mask tokens carry no posemb) and Zero/LearnedNullCond; PatchEmbedder of the noised
             latents + the stored sincos posemb; packing [patches; registers] with full
             attention and, with ``per_subseq_embs``, AdaLN per part; TimestepEmbedder
             (max period 256, 1000 / max_timestep); the AdaLN FlexTransformer; a
             ToPatchesLinearHead (norm, AdaLN shift/scale, projection) on the patches
  pipeline   MinRFPipeline: Euler steps from t = 1 in equal steps, CFG, and APG on the
             velocities with a momentum of -0.5 (``apg_space="velocity"``)

FlexTransformer blocks: LayerNorms without scale or bias (eps 1e-5), separate q/k/v and output
projections without bias, QK-norm, SwiGLU of width int(2 * mlp_ratio * D / 3) without bias,
attention scale 8 / head_dim (1 / sqrt(64) at the releases' 64-channel heads), no final norm;
AdaLN maps SiLU -> Linear(D, parts * 6 D) chunked (gate_msa, gate_mlp, shift_msa, scale_msa,
shift_mlp, scale_mlp) per part. The README's reconstruction settings are 20 to 25 steps,
guidance 7.5 with APG (``FlexTok.decode_options`` of the converted config).
"""

from __future__ import annotations

import ast

import ml_collections
import numpy as np

from vitok.config import load_preset
from vitok.interop import CONVERTERS, diffusers_vae
from vitok.interop.files import ConversionError, check_layout
from vitok.interop.safetensors_files import read_safetensors

DEFAULT_PRESET = "configs/flextok.py:imagenet256_d18"
PARTS = ("vae", "encoder", "decoder", "regularizer", "pipeline")
MODULES = {  # every module class a release's encoder / decoder may hold, by role
    "encoder": {
        "PerSampleOp": "op", "PatchEmbedder": "patches", "PositionalEmbeddingAdder": "posemb",
        "Registers1D": "registers", "BlockWiseSequencePacker": "packer",
        "FlexTransformer": "transformer", "SequenceUnpacker": "unpacker", "LinearHead": "head",
    },
    "decoder": {
        "PerSampleOp": "op", "LinearLayer": "from_codes", "PositionalEmbeddingAdder": "posemb",
        "MaskedNestedDropout": "dropout", "ZeroNullCond": "null", "LearnedNullCond": "null",
        "PatchEmbedder": "patches", "BlockWiseSequencePacker": "packer",
        "TimestepEmbedder": "time", "FlexTransformer": "transformer",
        "SequenceUnpacker": "unpacker", "ToPatchesLinearHead": "head",
    },
}  # fmt: skip
# The FlexTransformer / block arguments vitok maps, at the only values it maps.
BLOCK_DEFAULTS = dict(
    qkv_bias=False, proj_bias=False, mlp_bias=False, gated_mlp=True, qk_norm=True,
    head_dim=64, drop_path_rate=0.0,
)  # fmt: skip


def read_config(metadata: dict[str, str], where: str) -> dict:
    """The hydra config the release stores in its safetensors metadata, one part per key."""
    missing = [p for p in PARTS if p not in metadata]
    if missing:
        raise ConversionError(
            f"{where} carries no FlexTok config for {missing} in its metadata: is it a "
            "FlexTok release (apple/ml-flextok's save_safetensors)?"
        )
    config = {}
    for part in PARTS:
        try:
            config[part] = ast.literal_eval(metadata[part])
        except (ValueError, SyntaxError) as e:
            raise ConversionError(
                f"{where}: the metadata's {part!r} is not a config ({e})"
            ) from None
    return config


def _class(spec: dict) -> str:
    return str(spec.get("_target_", "")).rsplit(".", 1)[-1]


def modules_by_role(config: dict, part: str, where: str) -> dict[str, list[tuple[str, dict]]]:
    """{role: [(module name, its config), ...]} for the encoder or decoder, in order."""
    module_dict = config[part].get("module_dict")
    if not isinstance(module_dict, dict):
        raise ConversionError(f"{where}: the {part} config has no module_dict")
    roles: dict[str, list[tuple[str, dict]]] = {}
    for name, spec in module_dict.items():
        role = MODULES[part].get(_class(spec))
        if role is None:
            raise ConversionError(
                f"{where}: {part} module {name!r} is a {_class(spec) or spec.get('_target_')}, "
                f"which vitok does not map (known: {', '.join(sorted(MODULES[part]))})"
            )
        roles.setdefault(role, []).append((name, spec))
    return roles


def _one(roles: dict, role: str, part: str, where: str) -> tuple[str, dict]:
    found = roles.get(role, [])
    if len(found) != 1:
        raise ConversionError(
            f"{where}: the {part} needs exactly one {role} module, has {len(found)}"
        )
    return found[0]


# Arguments that change the maths away from what vitok maps: (class, key) -> the only value
# vitok maps (``None``: the argument must be absent, i.e. its default).
FIXED = {
    ("FlexTransformer", "act_layer"): None, ("FlexTransformer", "norm_layer"): None,
    ("FlexTransformer", "score_mod_read_key"): None, ("FlexTransformer", "mlp_ratio"): 4.0,
    ("LinearHead", "norm_layer"): None, ("LinearHead", "use_mup_readout"): False,
    ("ToPatchesLinearHead", "norm_layer"): None, ("ToPatchesLinearHead", "use_mup_readout"): False,
    ("LearnedNullCond", "replace_with_single_token"): False,
    ("TimestepEmbedder", "temb_as_tokens"): False,
    ("TimestepEmbedder", "frequency_embedding_size"): 256,
    ("PositionalEmbeddingAdder", "posemb_scaling"): "absolute",
}  # fmt: skip


def _check_fixed(config: dict, where: str) -> None:
    """Refuses, by name, a module argument that vitok does not map (``FIXED``)."""
    for part in ("encoder", "decoder"):
        for name, spec in config[part]["module_dict"].items():
            for (cls, key), value in FIXED.items():
                if _class(spec) == cls and key in spec and spec[key] != value:
                    raise ConversionError(
                        f"{where}: {part} module {name!r} ({cls}) has {key}={spec[key]!r}; "
                        f"vitok maps only {'its default' if value is None else repr(value)}"
                    )


def _check_transformer(spec: dict, part: str, where: str, adaln: bool) -> None:
    for key, value in BLOCK_DEFAULTS.items():
        if spec.get(key, value) != value:
            raise ConversionError(
                f"{where}: the {part} FlexTransformer has {key}={spec.get(key)!r}; vitok maps "
                f"only {key}={value!r}"
            )
    if bool(spec.get("adaLN_emb_read_key")) != adaln:
        raise ConversionError(
            f"{where}: the {part} transformer's AdaLN is {'missing' if adaln else 'unexpected'}"
        )
    if spec.get("rope_forward_read_key"):
        raise ConversionError(
            f"{where}: the {part} transformer uses RoPE, which vitok does not map"
        )


def read_architecture(config: dict, state: dict, where: str) -> dict:
    """Every size and definition the converted model needs, from the config and shapes."""
    enc, dec = (modules_by_role(config, p, where) for p in ("encoder", "decoder"))
    _check_fixed(config, where)
    order = [MODULES["decoder"][_class(s)] for s in config["decoder"]["module_dict"].values()]
    if order.index("dropout") < order.index("posemb") or order.index("null") < order.index(
        "dropout"
    ):
        raise ConversionError(
            f"{where}: vitok maps a decoder that adds the register posemb, then drops tokens, "
            "then applies the null condition (in that order)"
        )
    e_name, e_patch = _one(enc, "patches", "encoder", where)
    _, registers = _one(enc, "registers", "encoder", where)
    _, e_packer = _one(enc, "packer", "encoder", where)
    t_name, e_trunk = _one(enc, "transformer", "encoder", where)
    h_name, e_head = _one(enc, "head", "encoder", where)
    d_name, d_patch = _one(dec, "patches", "decoder", where)
    _, d_packer = _one(dec, "packer", "decoder", where)
    u_name, d_trunk = _one(dec, "transformer", "decoder", where)
    _, time = _one(dec, "time", "decoder", where)
    _, null = _one(dec, "null", "decoder", where)
    _check_transformer(e_trunk, "encoder", where, adaln=False)
    _check_transformer(d_trunk, "decoder", where, adaln=True)
    if e_packer.get("mask_mode") != "causal_last" or d_packer.get("mask_mode") != "full":
        raise ConversionError(
            f"{where}: vitok maps an encoder packed with mask 'causal_last' and a decoder with "
            f"'full', got {e_packer.get('mask_mode')!r} and {d_packer.get('mask_mode')!r}"
        )
    if registers.get("ordering_mode", "nested") != "nested":
        raise ConversionError(f"{where}: registers ordered by {registers['ordering_mode']!r}")
    patch = e_patch["patch_sizes"]
    if d_patch["patch_sizes"] != patch or patch[0] != patch[1]:
        raise ConversionError(
            f"{where}: encoder and decoder need the same square patch, got {patch} and {d_patch['patch_sizes']}"
        )
    posembs = {name: spec for name, spec in enc.get("posemb", []) + dec.get("posemb", [])}
    grids = [s["max_sizes"] for s in posembs.values() if s.get("posemb_type", "sincos") == "sincos"]
    register_posembs = [
        s for _, s in dec.get("posemb", []) if s.get("posemb_type") == "learnable_sum"
    ]
    if len(grids) != 2 or grids[0] != grids[1] or len(register_posembs) != 1:
        raise ConversionError(
            f"{where}: expected a sincos posemb per stack and a learned register posemb"
        )
    parts = int(d_trunk.get("adaLN_expansion", 1))
    if parts not in (1, 2) or (parts == 2) != bool(d_packer.get("per_subseq_embs")):
        raise ConversionError(
            f"{where}: AdaLN expansion {parts} with per_subseq_embs={d_packer.get('per_subseq_embs')}"
        )
    dims = {}
    for key, trunk in (("encoder", e_trunk), ("decoder", d_trunk)):  # mlp_ratio 4 (FIXED)
        width = int(trunk.get("dim", 768))
        dims[key] = dict(
            width=width, depth=int(trunk.get("depth", 12)), num_heads=width // 64,
            mlp_dim=int(2 * int(width * 4.0) / 3),
        )  # fmt: skip
    if _class(config["pipeline"]) != "MinRFPipeline":
        raise ConversionError(
            f"{where}: the pipeline is a {_class(config['pipeline'])}, not MinRFPipeline"
        )
    vae = config["vae"]
    downsample = 2 ** (len(diffusers_vae.read_dims(_vae_state(state), where)["mults"]) - 1)
    grid = grids[0]
    return dict(
        names=dict(enc_patch=e_name, enc_trunk=t_name, enc_head=h_name, dec_patch=d_name, dec_trunk=u_name),
        encoder=dims["encoder"], decoder=dims["decoder"], patch_size=int(patch[0]),
        latent_channels=int(e_patch["channels_in"]), num_registers=int(registers["n_max"]),
        fsq_levels=tuple(int(x) for x in config["regularizer"]["levels"]),
        image_size=(grid[0] * patch[0] * downsample, grid[1] * patch[1] * downsample),
        grid=tuple(int(g) for g in grid), adaln_parts=parts,
        null_condition="learned" if _class(null) == "LearnedNullCond" else "zeros",
        time_scale=1000.0 / float(time.get("max_timestep", 1000.0)),
        frequency_dim=256,
        head_adaln=bool(_one(dec, "head", "decoder", where)[1].get("adaLN_emb_read_key")),
        scaling_factor=vae.get("scaling_factor"),
    )  # fmt: skip


def _vae_state(state: dict) -> dict:
    return {k[len("vae.vae.") :]: v for k, v in state.items() if k.startswith("vae.vae.")}


def _linear(state: dict, name: str, bias: bool = True) -> dict:
    out = {"kernel": state[f"{name}.weight"].T}
    if bias:
        out["bias"] = state[f"{name}.bias"]
    return out


def _block(state: dict, prefix: str, heads: int) -> dict:
    """A FlexBlock -> vitok's Block / AdaLNBlock attention and SwiGLU (no norms to carry)."""
    wq, wk, wv = (state[f"{prefix}.attn.{n}.weight"].T for n in ("wq", "wk", "wv"))
    d = wq.shape[0]
    return {
        "attn": {
            "qkv": np.stack([w.reshape(d, heads, d // heads) for w in (wq, wk, wv)], axis=1),
            "out": state[f"{prefix}.attn.proj.weight"].T.reshape(heads, d // heads, d),
        },
        "mlp": {
            "gate": _linear(state, f"{prefix}.mlp.fc1", bias=False),
            "up": _linear(state, f"{prefix}.mlp.fc3", bias=False),
            "down": _linear(state, f"{prefix}.mlp.fc2", bias=False),
        },
    }


# vitok's modulation slots (shift1, scale1, gate1, shift2, scale2, gate2) in the release's chunk
# order (gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp).
SLOT_CHUNKS = (2, 3, 0, 4, 5, 1)


def _modulation(state: dict, prefix: str, parts: int) -> dict:
    """adaLN_modulation.1 [parts * 6 D, D] (parts: patches, registers) -> vitok's Modulation
    kernel [D, 6 parts, D] and bias [6 parts, D] (parts: registers, patches)."""
    w, b = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
    d = w.shape[1]
    w, b = w.reshape(parts, 6, d, d), b.reshape(parts, 6, d)
    order = [1, 0] if parts == 2 else [0]  # vitok's sequence is [registers; patches]
    w = np.concatenate([w[p][list(SLOT_CHUNKS)] for p in order])  # [6 parts, D_out, D_in]
    b = np.concatenate([b[p][list(SLOT_CHUNKS)] for p in order])
    return {"kernel": w.transpose(2, 0, 1), "bias": b}


def _posemb(state: dict, name: str, grid: tuple[int, int]) -> np.ndarray:
    """A stored [1, D, H, W] table, cut to the grid ("absolute" scaling) -> [h * w, D]."""
    table = state[f"{name}.posembs"][0, :, : grid[0], : grid[1]]
    return table.reshape(table.shape[0], -1).T


def params_from_state(state: dict, arch: dict, config: dict) -> dict:
    """The release's tensors -> vitok FlexTok params (nested dicts of float32 arrays)."""
    e, d = "encoder.module_dict.", "decoder.module_dict."
    enc_modules = config["encoder"]["module_dict"]
    dec_modules = config["decoder"]["module_dict"]
    by_class = lambda modules, cls: [n for n, s in modules.items() if _class(s) == cls]  # noqa: E731
    enc_posemb = by_class(enc_modules, "PositionalEmbeddingAdder")[0]
    dec_posembs = by_class(dec_modules, "PositionalEmbeddingAdder")
    reg_posemb = next(
        n for n in dec_posembs if dec_modules[n].get("posemb_type") == "learnable_sum"
    )
    patch_posemb = next(n for n in dec_posembs if n != reg_posemb)
    names = arch["names"]
    he, hd = arch["encoder"]["num_heads"], arch["decoder"]["num_heads"]
    params = {
        "enc_patch_embed": _linear(state, f"{e}{names['enc_patch']}.patch_proj"),
        "enc_posemb": _posemb(state, e + enc_posemb, arch["grid"]),
        "enc_registers": state[f"{e}{by_class(enc_modules, 'Registers1D')[0]}.registers"],
        "encoder": {
            "blocks": {
                i: _block(state, f"{e}{names['enc_trunk']}.blocks.{i}", he)
                for i in range(arch["encoder"]["depth"])
            }
        },
        "to_fsq": _linear(state, f"{e}{names['enc_head']}.proj"),
        "from_fsq": _linear(state, f"{d}{by_class(dec_modules, 'LinearLayer')[0]}.proj"),
        "mask_token": state[f"{d}{by_class(dec_modules, 'MaskedNestedDropout')[0]}.dropout_mask_token"][None],
        "dec_register_posemb": state[f"{d}{reg_posemb}.posembs"][0, 0][:, : arch["num_registers"]].T,
        "dec_patch_embed": _linear(state, f"{d}{names['dec_patch']}.patch_proj"),
        "dec_posemb": _posemb(state, d + patch_posemb, arch["grid"]),
        "time_embed": {
            "fc1": _linear(state, f"{d}{by_class(dec_modules, 'TimestepEmbedder')[0]}.mlp.0"),
            "fc2": _linear(state, f"{d}{by_class(dec_modules, 'TimestepEmbedder')[0]}.mlp.2"),
        },
        "decoder": {"blocks": {}},
    }  # fmt: skip
    if arch["null_condition"] == "learned":
        params["null_token"] = state[f"{d}{by_class(dec_modules, 'LearnedNullCond')[0]}.nullcond"][
            None
        ]
    trunk = f"{d}{names['dec_trunk']}.blocks"
    for i in range(arch["decoder"]["depth"]):
        block = _block(state, f"{trunk}.{i}", hd)
        block["modulation"] = _modulation(
            state, f"{trunk}.{i}.adaLN_modulation.1", arch["adaln_parts"]
        )
        params["decoder"]["blocks"][i] = block
    head = f"{d}{by_class(dec_modules, 'ToPatchesLinearHead')[0]}"
    width = arch["decoder"]["width"]
    if arch["head_adaln"]:
        w, b = state[f"{head}.adaLN_modulation.1.weight"], state[f"{head}.adaLN_modulation.1.bias"]
        final = {
            "kernel": w.reshape(2, width, width).transpose(2, 0, 1),
            "bias": b.reshape(2, width),
        }
    else:  # an unmodulated head: shift = scale = 0
        final = {
            "kernel": np.zeros((width, 2, width), np.float32),
            "bias": np.zeros((2, width), np.float32),
        }
    params["decoder"]["final_modulation"] = final
    params["dec_out"] = _linear(state, f"{head}.proj")
    return params


def expected_layout(arch: dict, config: dict, state: dict) -> dict[str, tuple[int, ...]]:
    """The names and shapes the release's modules create for this architecture."""
    e, d = "encoder.module_dict.", "decoder.module_dict."
    enc_modules, dec_modules = config["encoder"]["module_dict"], config["decoder"]["module_dict"]
    we, wd = arch["encoder"]["width"], arch["decoder"]["width"]
    p, c, n = arch["patch_size"], arch["latent_channels"], arch["num_registers"]
    fsq, parts = len(arch["fsq_levels"]), arch["adaln_parts"]
    layout: dict[str, tuple[int, ...]] = {}

    def linear(name, dout, din, bias=True):
        layout[f"{name}.weight"] = (dout, din)
        if bias:
            layout[f"{name}.bias"] = (dout,)

    def blocks(name, width, depth, mlp, adaln):
        for i in range(depth):
            b = f"{name}.blocks.{i}"
            for proj in ("wq", "wk", "wv", "proj"):
                linear(f"{b}.attn.{proj}", width, width, bias=False)
            linear(f"{b}.mlp.fc1", mlp, width, bias=False)
            linear(f"{b}.mlp.fc3", mlp, width, bias=False)
            linear(f"{b}.mlp.fc2", width, mlp, bias=False)
            if adaln:
                linear(f"{b}.adaLN_modulation.1", parts * 6 * width, width)

    for part, modules, prefix, width in (
        ("encoder", enc_modules, e, we),
        ("decoder", dec_modules, d, wd),
    ):
        for name, spec in modules.items():
            cls, full = _class(spec), prefix + name
            if cls == "PatchEmbedder":
                linear(f"{full}.patch_proj", width, c * p * p)
            elif cls == "PositionalEmbeddingAdder":
                sizes = list(spec["max_sizes"])
                layout[f"{full}.posembs"] = (
                    (1, width, *sizes) if len(sizes) == 2 else (1, 1, width, sizes[0])
                )
            elif cls == "Registers1D":
                layout[f"{full}.registers"] = (n, width)
            elif cls == "FlexTransformer":
                blocks(full, width, arch[part]["depth"], arch[part]["mlp_dim"], part == "decoder")
            elif cls == "LinearHead":
                linear(f"{full}.proj", fsq, width)
            elif cls == "LinearLayer":
                linear(f"{full}.proj", width, fsq)
            elif cls == "MaskedNestedDropout":
                layout[f"{full}.dropout_mask_token"] = (width,)
            elif cls == "LearnedNullCond":
                layout[f"{full}.nullcond"] = (width,)
            elif cls == "TimestepEmbedder":
                linear(f"{full}.mlp.0", width, arch["frequency_dim"])
                linear(f"{full}.mlp.2", width, width)
            elif cls == "ToPatchesLinearHead":
                if spec.get("adaLN_emb_read_key"):
                    linear(f"{full}.adaLN_modulation.1", 2 * width, width)
                linear(f"{full}.proj", c * p * p, width)
    for name, value in diffusers_vae.expected_layout(
        diffusers_vae.read_dims(_vae_state(state), "the VAE")
    ).items():
        layout[f"vae.vae.{name}"] = value
    return layout


def fill_config(
    config: ml_collections.ConfigDict, arch: dict, latent_scale: float, vae_model
) -> None:
    """``config.model`` becomes the converted FlexTok (its frozen VAE section ``vae_model``)."""
    model = config.model
    model.name = "flextok"
    model.image_size = arch["image_size"]
    model.channels = 3
    model.patch_size = arch["patch_size"]
    model.num_registers = arch["num_registers"]
    model.fsq_levels = arch["fsq_levels"]
    model.encoder = ml_collections.ConfigDict(arch["encoder"])
    model.decoder = ml_collections.ConfigDict(arch["decoder"])
    release = dict(
        block_style="flextok", adaln_parts=arch["adaln_parts"], posemb="learned",
        fsq_bound="release", fsq_input_norm=True, mask_posemb=False,
        null_condition=arch["null_condition"], time_max_period=256.0,
        time_scale=arch["time_scale"], apg_space="velocity", apg_momentum=-0.5,
        prediction="velocity", time_shift=1.0, decoder_patches="disjoint",
        adaln_registers=False, register_mixing=False, linear_route=False, repa_dim=0,
        repa_layer=0,
    )  # fmt: skip
    for key, value in release.items():
        model[key] = value
    model.scan_layers = False  # the params below are per block
    if "repa_encoder" in model:
        model.repa_encoder.name = ""
    if "repa_weight" in config.get("flextok", {}):
        config.flextok.repa_weight = 0.0  # no REPA target in a release
    size = int(arch["image_size"][0])
    sizes = f"resize({size})|central_crop({size})"
    for section in config.get("evals", {}).values():  # evaluate at the model's image size
        if "data" in section and "pp" in section.data:
            pp = section.data.pp.replace("resize(256)|central_crop(256)", sizes)
            section.data.pp = pp
        if section.get("type") == "reconstruction":  # the release README's sampler
            section.steps, section.guidance, section.apg = 25, 7.5, True
    if "pp" in config.get("data", {}):
        config.data.pp = config.data.pp.replace(
            "resize(256)|random_crop(256)", f"resize({size})|random_crop({size})"
        )
    vae = ml_collections.ConfigDict(
        {k: v for k, v in dict(vae_model).items() if k != "name"} | {"name": "vae"}
    )
    vae.checkpoint = ""  # set by vitok.tools.convert to the VAE's own run
    vae.image_size = arch["image_size"]
    vae.dtype = model.get("dtype", "float32")
    vae.latent_scale = float(latent_scale)
    model.vae = vae


@CONVERTERS.register("flextok")
def convert(path: str, config: ml_collections.ConfigDict):
    """A FlexTok release .safetensors -> (config, params, {"vae": (VAE config, VAE params)}):
    the FlexTok run and the run of its frozen VAE, which ``vitok.tools.convert`` writes as
    ``DIR/vae``."""
    state, metadata = read_safetensors(path)
    release = read_config(metadata, path)
    arch = read_architecture(release, state, path)
    check_layout(state, expected_layout(arch, release, state), path)
    scale = arch["scaling_factor"]
    if scale is None:
        scale = config.model.vae.get("latent_scale", 0.0) if "vae" in config.model else 0.0
        if not scale:
            raise ConversionError(
                f"{path}: the release's VAE config has no scaling_factor; give the one in its "
                "VAE's config.json as --config.model.vae.latent_scale=..."
            )
    vae_config = load_preset(diffusers_vae.DEFAULT_PRESET, ())
    vae_params = diffusers_vae.convert_state(
        _vae_state(state), vae_config.model, path, float(scale)
    )
    vae_config.model.image_size = arch["image_size"]
    fill_config(config, arch, float(scale), vae_config.model)
    return config, params_from_state(state, arch, release), {"vae": (vae_config, vae_params)}
