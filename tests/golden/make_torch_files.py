"""Makes golden/torch_state_{zip,legacy}.pth and golden/torch_state.npz: one small state dict
written by torch.save in both of its formats, and the same tensors as numpy arrays.

    PYTHONPATH=/work/main /tmp/refenv/bin/python tests/golden/make_torch_files.py   # torch 2.14.1

The dict holds a float32 matrix, a non-contiguous int64 view (a column slice, so the stored
strides matter), a 0-d tensor, a float16 vector and an nn.Parameter (pickled through
torch._utils._rebuild_parameter).
"""

import os
from collections import OrderedDict

import numpy as np
import torch

HERE = os.path.dirname(__file__)


def main():
    g = torch.Generator().manual_seed(0)
    state = OrderedDict(
        {
            "layer.weight": torch.randn(3, 4, generator=g),
            "layer.index": torch.arange(12).reshape(3, 4)[:, 1:3],
            "bn.num_batches_tracked": torch.tensor(7),
            "half": torch.randn(5, generator=g).half(),
            "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        }
    )
    torch.save(state, os.path.join(HERE, "torch_state_zip.pth"))
    torch.save(
        state, os.path.join(HERE, "torch_state_legacy.pth"), _use_new_zipfile_serialization=False
    )
    np.savez(
        os.path.join(HERE, "torch_state.npz"), **{k: v.detach().numpy() for k, v in state.items()}
    )


if __name__ == "__main__":
    main()
