"""Makes golden/nar_gpt_tiny.npz and golden/llamagen_gpt_tiny.npz: NAR's and LlamaGen's own
class-conditional GPTs on seeded random weights.

    git -C <ThisisBillhe/NAR, HEAD 225c1fb> archive HEAD NAR-images/autoregressive \\
        NAR-images/utils | tar -x -C /tmp/nar
    git -C <FoundationVision/LlamaGen, HEAD ce98ec4> archive HEAD autoregressive utils \\
        | tar -x -C /tmp/llamagen
    PYTHONPATH=/work/main:/tmp/nar/NAR-images /tmp/refenv/bin/python \\
        tests/golden/make_llamagen_gpt.py nar
    PYTHONPATH=/work/main:/tmp/llamagen /tmp/refenv/bin/python \\
        tests/golden/make_llamagen_gpt.py llamagen

The model is the repository's ``autoregressive.models.gpt.Transformer`` (torch 2.13.0, CPU,
float32) with ``ModelArgs(dim=128, n_layer=2, n_head=2, vocab_size=64, num_classes=10,
block_size=16, cls_token_num=1)`` and every dropout 0 (``official_layouts.GPT_TINY``; NAR's
copy adds ``layers.2`` and the medusa head). Its state_dict's names and shapes are stored as
``shapes``; the values are ``official_layouts.gpt_state_dict(shapes, 0)``, loaded with
``load_state_dict`` (strict) from a file ``official_layouts.write_torch_file`` wrote as
``{"model": ...}``. On ``gpt_inputs(1, 3)`` (labels, tokens):
  train_logits   the training forward (``model.train()``, label dropout off): NAR with its
                 proximity mask as train_c2i.py builds it, on all 16 tokens; LlamaGen causal
                 on tokens[:, :-1] -> [3, 16, 64], the logits of every token
  greedy         ``generate(model, labels, 16, cfg_scale=2.0, top_k=1)`` (the repository's
                 sampler; top-1 filtering makes it greedy) -> int64 [3, 16]
  pass_logits    the guided logits that sampler drew each token from, by the token's raster
                 position -> [16, 3, 64]
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch
from autoregressive.models import generate as generate_module
from autoregressive.models import gpt

from tests.official_layouts import GPT_TINY, gpt_inputs, gpt_state_dict, write_torch_file

CFG_SCALE = 2.0


def build() -> gpt.Transformer:
    d = GPT_TINY
    args = gpt.ModelArgs(
        dim=d["dim"], n_layer=d["n_layer"], n_head=d["n_head"], vocab_size=d["vocab_size"],
        num_classes=d["num_classes"], block_size=d["grid"] ** 2, cls_token_num=1,
        token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.1,
    )  # fmt: skip
    return gpt.Transformer(args)


def emission_positions(grid: int, nar: bool) -> list[list[int]]:
    """The raster positions each sampler call emits, in the order it emits them: NAR's
    anti-diagonals by ascending row (first, middle, last of decode_proximity_tokens), or one
    token a call in raster order."""
    if not nar:
        return [[p] for p in range(grid * grid)]
    return [
        [i * grid + (c - i) for i in range(grid) if 0 <= c - i < grid] for c in range(2 * grid - 1)
    ]


def main(release: str):
    nar = release == "nar"
    torch.manual_seed(0)
    model = build()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    state = gpt_state_dict(shapes, 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gpt.pt")
        write_torch_file(path, {"model": state, "steps": 0})
        loaded = torch.load(path, weights_only=True)["model"]
    model.load_state_dict(loaded, strict=True)
    labels, tokens = (torch.from_numpy(a) for a in gpt_inputs(1, 3))
    grid = GPT_TINY["grid"]

    model.train()
    model.cls_embedding.dropout_prob = 0.0  # keeps the null row, drops no label
    with torch.no_grad():
        if nar:
            n = 1 + grid * grid
            mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
            model.setup_proximity_mask(mask[-grid * grid :, -grid * grid :], grid * grid)
            mask = mask.unsqueeze(0).repeat(len(labels), 1, 1)
            train_logits, _ = model(idx=tokens, cond_idx=labels, mask=mask)
        else:
            train_logits, _ = model(idx=tokens[:, :-1], cond_idx=labels)

    model.eval()
    drawn = []
    original_sample = generate_module.sample

    def recording_sample(logits, **kwargs):
        drawn.append(logits[:, -1:] if not nar else logits)
        return original_sample(logits, **kwargs)

    generate_module.sample = recording_sample
    with torch.no_grad():
        greedy = generate_module.generate(
            model, labels, grid * grid, cfg_scale=CFG_SCALE, temperature=1.0, top_k=1
        )
    generate_module.sample = original_sample
    pass_logits = np.zeros((grid * grid, len(labels), GPT_TINY["vocab_size"]), np.float32)
    positions = emission_positions(grid, nar)
    assert len(drawn) == len(positions)
    for call, where in zip(drawn, positions, strict=True):
        assert call.shape[1] == len(where)
        for k, p in enumerate(where):
            pass_logits[p] = call[:, k].numpy()
    out = {
        "shapes": np.array(json.dumps(shapes)),
        "labels": labels.numpy(),
        "tokens": tokens.numpy(),
        "train_logits": train_logits.numpy(),
        "greedy": greedy.numpy().astype(np.int64),
        "pass_logits": pass_logits,
        "cfg_scale": np.array(CFG_SCALE),
    }
    name = "nar_gpt_tiny.npz" if nar else "llamagen_gpt_tiny.npz"
    np.savez_compressed(os.path.join(os.path.dirname(__file__), name), **out)
    print(name, {k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main(sys.argv[1])
