"""Every notebook in colabs/ runs top to bottom (code cells in order, few steps)."""

import glob
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, xla_flags

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))
# What each notebook prints once it has run to the end.
EXPECTED = {
    "vit_tiny.ipynb": "of these 32 digits correct",
    "flextok_tiny.ipynb": "decoded 6 held-out photos at 6 token counts",
    "karl_tiny.ipynb": "tokenized 6 held-out photos at 4 requested qualities",
    "official_flextok.ipynb": "decoded 2 photos at 4 token counts",
}
# The picture each notebook leaves in its workdir.
PICTURE = {"official_flextok.ipynb": "reconstructions.png"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    cells = json.load(open(path))["cells"]
    source = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = tmp_path / "notebook.py"
    script.write_text("import matplotlib\nmatplotlib.use('Agg')\n" + source)
    env = dict(
        os.environ,
        VITOK_COLAB_STEPS="4",
        VITOK_COLAB_EVAL_EXAMPLES="16",
        VITOK_COLAB_BASELINE_EXAMPLES="256",
        VITOK_COLAB_LINEAR_FIT_EXAMPLES="256",
        VITOK_COLAB_WORKDIR=str(tmp_path / "work"),
        VITOK_COLAB_RANDOM_FLEXTOK="1",
        XLA_FLAGS=xla_flags(1),
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert EXPECTED[os.path.basename(path)] in proc.stdout
    picture = PICTURE.get(os.path.basename(path), "curves.png")
    assert os.path.exists(tmp_path / "work" / picture)
