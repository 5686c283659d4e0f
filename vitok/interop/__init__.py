"""The papers' released checkpoints as vitok runs.

A converter (``CONVERTERS``, by name) reads one release's file as the user downloaded it,
checks every name and shape against that release's layout, and returns the vitok config and
params of the same model; ``vitok.tools.convert`` writes them as a run directory that
``vitok.runs``, ``vitok.inference``, the tools, the evaluators and ``init_from`` read like any
trained run. Where the release defines something differently from vitok's own models (how a
kernel is resized, where an embedding is added), the converted config selects the release's
definition.
"""

from vitok.interop.files import ConversionError, check_layout, read_npz
from vitok.registry import Registry

# name -> fn(checkpoint_path, config) -> (config, params); modules register on first lookup.
CONVERTERS = Registry(
    "converter",
    package="vitok.interop",
    modules={
        "llamagen_vq": "llamagen",
        "flextok_vae": "diffusers_vae",
        "flextok": "flextok",
        "nar": "llamagen_gpt",
        "llamagen_gpt": "llamagen_gpt",
    },
)

__all__ = ["CONVERTERS", "ConversionError", "check_layout", "read_npz"]
