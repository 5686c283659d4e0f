"""Makes golden/inception_fid.npz: pytorch-fid 0.3.0's Inception-v3 on seeded random weights.

    /tmp/refenv/bin/pip install torch torchvision pytorch-fid   # torch 2.14.1, torchvision 0.29
    PYTHONPATH=/work/main /tmp/refenv/bin/python tests/golden/make_inception.py

The weights' names and shapes are those of ``pytorch_fid.inception.fid_inception_v3()``
(stored here as ``shapes``, a JSON table); their values are
``official_layouts.inception_state_dict(shapes, 0)``, loaded with ``load_state_dict`` into
``InceptionV3([block])`` with that network (pytorch-fid's own class, ``fid_inception_v3``'s
download replaced by our state dict). Stored, float32 on CPU:
  pool3      InceptionV3([3]) on fid_images(1, 3, 64) (3 RGB 64x64 images in [0, 1]): [3, 2048]
  logits     the 1008-way fc on those pool features
  block0_a, block0_b   InceptionV3([0]) features (64-d) of fid_images(2, 80, 32) and
                       fid_images(3, 80, 32)
  fid_block0 pytorch_fid.fid_score.calculate_frechet_distance of the two sets' mean and
             np.cov, as pytorch-fid's calculate_activation_statistics computes them
"""

import json
import os
from unittest import mock

import numpy as np
import torch
from pytorch_fid import fid_score, inception

from tests.official_layouts import fid_images, inception_state_dict


def main():
    torch.manual_seed(0)
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None):
        with mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd: None):
            template = _FID_INCEPTION_V3()
    shapes = {k: list(v.shape) for k, v in template.state_dict().items()}
    state = {k: torch.from_numpy(v) for k, v in inception_state_dict(shapes, 0).items()}
    out = {"shapes": np.array(json.dumps(shapes))}

    def net(block):
        with mock.patch.object(inception, "fid_inception_v3", lambda: _loaded(state)):
            return inception.InceptionV3([block]).eval()

    with torch.no_grad():
        x = torch.from_numpy(fid_images(1, 3, 64)).permute(0, 3, 1, 2)
        pool = net(3)(x)[0][:, :, 0, 0]
        out["pool3"] = pool.numpy()
        model = _loaded(state).eval()
        out["logits"] = model.fc(pool).numpy()
        feats = []
        for seed in (2, 3):
            x = torch.from_numpy(fid_images(seed, 80, 32)).permute(0, 3, 1, 2)
            f = net(0)(x)[0]
            feats.append(torch.nn.functional.adaptive_avg_pool2d(f, (1, 1))[:, :, 0, 0].numpy())
    out["block0_a"], out["block0_b"] = feats
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in feats]
    out["fid_block0"] = np.array(fid_score.calculate_frechet_distance(*stats[0], *stats[1]))
    path = os.path.join(os.path.dirname(__file__), "inception_fid.npz")
    np.savez_compressed(path, **out)
    print({k: v.shape for k, v in out.items()}, float(out["fid_block0"]), "->", path)


_FID_INCEPTION_V3 = inception.fid_inception_v3


def _loaded(state):
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: state):
        return _FID_INCEPTION_V3()


if __name__ == "__main__":
    main()
