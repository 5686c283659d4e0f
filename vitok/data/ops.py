"""Preprocessing ops, found by name from a big_vision-style string.

``"decode(channels=3)|resize(36)|random_crop(32)|flip_lr|value_range(-1, 1)"`` builds a function
``(example: dict, rng: np.random.Generator) -> dict``. Each op is registered with ``@op(name)``;
its arguments are Python literals.

Bad images raise ``BadImageError`` naming the file; sound conversions happen silently:
grayscale -> RGB, RGBA / LA -> RGB composited over white, 16-bit -> 8-bit, palette -> RGB.
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable

import numpy as np

from vitok.registry import Registry

Example = dict
Op = Callable[[Example, np.random.Generator], Example]

OPS = Registry("preprocessing op")


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file."""


op = OPS.register


def parse(pp: str | list[str] | tuple[str, ...]) -> Op:
    """Builds the composed op from ``"a(1)|b|c(x=2)"`` or a list of op strings."""
    specs = [s.strip() for s in (pp.split("|") if isinstance(pp, str) else pp) if s.strip()]
    ops = [_build(spec) for spec in specs]

    def apply(example: Example, rng: np.random.Generator) -> Example:
        for fn in ops:
            example = fn(example, rng)
        return example

    return apply


def _build(spec: str) -> Op:
    try:
        node = ast.parse(spec, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse preprocessing op {spec!r}: {e.msg}") from None
    if isinstance(node, ast.Name):
        name, args, kwargs = node.id, [], {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise ValueError(f"preprocessing op {spec!r}: arguments must be literals") from None
    else:
        raise ValueError(f"cannot parse preprocessing op {spec!r}; expected name or name(args)")
    if name not in OPS:
        raise ValueError(f"unknown preprocessing op {name!r} in {spec!r}; known: {OPS.names()}")
    try:
        return OPS.lookup(name)(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for preprocessing op {spec!r}: {e}") from None


def _where(example: Example) -> str:
    return str(example.get("path", "<unnamed example>"))


# --- decoding and colour conversion ----------------------------------------------------------------


def to_uint8_rgb(image: np.ndarray, channels: int | None, where: str) -> np.ndarray:
    """Any array image -> uint8 [H, W, C]: 16-bit scaled to 8-bit, alpha composited over white,
    and the channel count converted to ``channels`` (1 or 3) when given."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise BadImageError(f"{where}: expected an image [H, W, C<=4], got shape {image.shape}")
    if image.dtype == np.uint16 or (image.dtype.kind in "iu" and image.max(initial=0) > 255):
        image = np.round(image.astype(np.float32) * (255.0 / 65535.0))
    elif image.dtype.kind == "f":
        image = np.clip(image, 0.0, 1.0) * 255.0 if image.max(initial=0) <= 1.0 else image
    elif image.dtype == bool:
        image = image.astype(np.float32) * 255.0
    image = np.clip(image, 0, 255).astype(np.float32)
    if image.shape[-1] in (2, 4):  # colour + alpha: composite over white
        alpha = image[..., -1:] / 255.0
        image = image[..., :-1] * alpha + 255.0 * (1.0 - alpha)
    image = np.round(image).astype(np.uint8)
    if channels == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif channels == 1 and image.shape[-1] == 3:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        image = np.round(luma)[..., None].astype(np.uint8)
    elif channels not in (None, 1, 3):
        raise ValueError(f"decode(channels=...) must be 1 or 3, got {channels}")
    return image


@contextlib.contextmanager
def _bad_image_errors(where: str):
    """PIL's failures to open or decode an image, as one-line ``BadImageError``s naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except UnidentifiedImageError:
        raise BadImageError(f"{where}: not a readable image (corrupt or unknown format)") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{where}: image too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{where}: cannot decode image (truncated or corrupt): {e}") from None


def decode_bytes(data: bytes, where: str) -> np.ndarray:
    """Encoded jpg/png/webp/... bytes -> an array in the file's own depth and channels."""
    from PIL import Image

    if not data:
        raise BadImageError(f"{where}: file is empty")
    with _bad_image_errors(where):
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif img.mode == "1":
                img = img.convert("L")
            array = np.asarray(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L") and array.dtype != np.uint16:
        array = np.clip(array, 0, 65535).astype(np.uint16)
    return array


@op("decode")
def decode(channels: int | None = 3) -> Op:
    """Decodes encoded bytes (or normalises an array) to uint8 [H, W, channels]."""

    def fn(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        where = _where(example)
        if isinstance(image, (bytes, bytearray, np.bytes_)):
            image = decode_bytes(bytes(image), where)
        return example | {"image": to_uint8_rgb(image, channels, where)}

    return fn


# --- geometry --------------------------------------------------------------------------------------


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((width, height), Image.BICUBIC))
    return out[..., None] if squeeze else out


@op("resize")
def resize(size: int | tuple[int, int]) -> Op:
    """``resize(s)``: shorter side to s, aspect kept; ``resize((h, w))``: exactly h x w."""

    def fn(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        h, w = image.shape[:2]
        if isinstance(size, int):
            scale = size / min(h, w)
            target = (max(size, round(h * scale)), max(size, round(w * scale)))
        else:
            target = tuple(size)
        return example | {"image": _resize(image, *target)}

    return fn


def _check_fits(example: Example, size: tuple[int, int]) -> None:
    h, w = example["image"].shape[:2]
    if h < size[0] or w < size[1]:
        raise BadImageError(
            f"{_where(example)}: image is {h}x{w}, smaller than the crop {size[0]}x{size[1]}; "
            "add a resize op before the crop"
        )


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@op("random_crop")
def random_crop(size: int | tuple[int, int]) -> Op:
    size = _pair(size)

    def fn(example: Example, rng: np.random.Generator) -> Example:
        _check_fits(example, size)
        image = example["image"]
        top = rng.integers(0, image.shape[0] - size[0] + 1)
        left = rng.integers(0, image.shape[1] - size[1] + 1)
        return example | {"image": image[top : top + size[0], left : left + size[1]]}

    return fn


@op("central_crop")
def central_crop(size: int | tuple[int, int]) -> Op:
    size = _pair(size)

    def fn(example: Example, rng: np.random.Generator) -> Example:
        _check_fits(example, size)
        image = example["image"]
        top = (image.shape[0] - size[0]) // 2
        left = (image.shape[1] - size[1]) // 2
        return example | {"image": image[top : top + size[0], left : left + size[1]]}

    return fn


def inception_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    area: tuple[float, float] = (0.08, 1.0),
    aspect: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop (Szegedy et al. 2015; torchvision's
    RandomResizedCrop): up to 10 draws of an area fraction uniform in ``area`` and a log-uniform
    aspect w/h in ``aspect``; the first that fits is placed uniformly. Otherwise the central
    crop with the aspect clipped to the range."""
    total = height * width
    log_low, log_high = np.log(aspect[0]), np.log(aspect[1])
    for _ in range(10):
        target = total * rng.uniform(*area)
        ratio = np.exp(rng.uniform(log_low, log_high))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    ratio = width / height
    if ratio < aspect[0]:
        w, h = width, int(round(width / aspect[0]))
    elif ratio > aspect[1]:
        h, w = height, int(round(height * aspect[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _cv2():
    """OpenCV with one thread: the pipeline runs examples in parallel, not one op's pixels."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def _resize_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w] or [h, w, c] -> [height, width] or [height, width, c], bicubic. OpenCV's
    kernel (Keys, a = -0.75; about 4x faster than PIL) where neither side shrinks 2x or more,
    as after DCT-scaled decoding of a JPEG crop (unless the 1/8 scale caps it); PIL's
    antialiased bicubic for stronger reductions, where an unfiltered kernel would alias."""
    if image.shape[:2] == (height, width):
        return image
    if image.shape[0] < 2 * height and image.shape[1] < 2 * width:
        cv2 = _cv2()
        out = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
        return out.reshape(height, width, *image.shape[2:])  # OpenCV drops a single channel
    return _resize(np.ascontiguousarray(image), height, width)


def _decode_jpeg_region(
    data: bytes,
    draw_box: Callable[[int, int], tuple[int, int, int, int]],
    out: tuple[int, int],
    where: str,
) -> np.ndarray:
    """RGB uint8 of the box ``draw_box(height, width)`` gives (top, left, h, w in full-size
    pixels of the size in the JPEG's header), decoded at the smallest DCT scale (1/1, 1/2, 1/4,
    1/8) at which the box still has at least ``out`` pixels. EXIF orientation is ignored, as
    ``decode`` ignores it."""
    from PIL import Image

    cv2 = _cv2()
    with _bad_image_errors(where), Image.open(io.BytesIO(data)) as img:  # the header only
        full_w, full_h = img.size
    top, left, h, w = draw_box(full_h, full_w)
    scale = 1
    while scale < 8 and h // (2 * scale) >= out[0] and w // (2 * scale) >= out[1]:
        scale *= 2
    reduced = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
    flags = reduced.get(scale, cv2.IMREAD_REDUCED_COLOR_8) | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None:
        raise BadImageError(f"{where}: cannot decode image (truncated or corrupt JPEG)")
    fy, fx = bgr.shape[0] / full_h, bgr.shape[1] / full_w  # the decoded scale, rounded up
    box = bgr[round(top * fy) : round((top + h) * fy), round(left * fx) : round((left + w) * fx)]
    return cv2.cvtColor(box, cv2.COLOR_BGR2RGB)


@op("inception_crop")
def inception_crop(
    size: int | tuple[int, int],
    area: tuple[float, float] = (0.08, 1.0),
    aspect: tuple[float, float] = (3 / 4, 4 / 3),
) -> Op:
    """A random-resized crop (``inception_box``) resized to ``size`` (bicubic). On JPEG bytes
    it decodes as well, fused: only the crop is used, decoded at a reduced DCT scale where the
    crop has pixels to spare (as tf.image.decode_and_crop_jpeg does), so put it first in place
    of ``decode``; on an array it crops a decoded image."""
    size = _pair(size)
    if not (0 < area[0] <= area[1] <= 1 and 0 < aspect[0] <= aspect[1]):
        raise ValueError(f"inception_crop: bad area {area} or aspect {aspect} range")

    def fn(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        where = _where(example)
        if isinstance(image, (bytes, bytearray, np.bytes_)):
            data = bytes(image)
            if data.startswith(b"\xff\xd8"):  # JPEG: the box is drawn from its header's size

                def draw(height: int, width: int) -> tuple[int, int, int, int]:
                    return inception_box(rng, height, width, area, aspect)

                crop = _decode_jpeg_region(data, draw, size, where)
                return example | {"image": _resize_crop(crop, *size)}
            image = to_uint8_rgb(decode_bytes(data, where), 3, where)
        top, left, h, w = inception_box(rng, image.shape[0], image.shape[1], area, aspect)
        return example | {"image": _resize_crop(image[top : top + h, left : left + w], *size)}

    return fn


@op("resize_center_crop")
def resize_center_crop(size: int, crop_ratio: float = 0.875) -> Op:
    """Evaluation's convention: the shorter side to round(size / crop_ratio), then the central
    size x size crop (ImageNet: 224 from 256 at 0.875)."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"resize_center_crop: crop_ratio must be in (0, 1], got {crop_ratio}")
    resize_fn, crop_fn = resize(int(round(size / crop_ratio))), central_crop(size)

    def fn(example: Example, rng: np.random.Generator) -> Example:
        return crop_fn(resize_fn(example, rng), rng)

    return fn


@op("random_erasing")
def random_erasing(
    probability: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> Op:
    """Random erasing (Zhong et al. 2020; timm's mode "pixel", one box, as DeiT uses it): with
    ``probability``, a box of area fraction in ``area`` and log-uniform aspect in ``aspect``
    is filled with per-pixel standard normal noise. Goes after ``value_range`` (float images
    around 0). Up to 10 draws for a box that fits; none fits: the image is left as it is."""

    def fn(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        if rng.random() >= probability:
            return example
        if image.dtype == np.uint8:
            raise ValueError("random_erasing goes after value_range (it fills normal noise)")
        height, width, channels = image.shape
        for _ in range(10):
            target = height * width * rng.uniform(*area)
            ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
            h = int(round(np.sqrt(target * ratio)))
            w = int(round(np.sqrt(target / ratio)))
            if h < height and w < width:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                out = image.copy()
                noise = rng.standard_normal((h, w, channels)).astype(image.dtype)
                out[top : top + h, left : left + w] = noise
                return example | {"image": out}
        return example

    return fn


# RandAugment (Cubuk et al. 2020) as DeiT runs it: timm's "rand-m9-mstd0.5-inc1", the op set
# whose strength increases with the magnitude. Each op maps a level in [0, 1] (magnitude / 10)
# to its argument; a signed argument gets a random sign.
RAND_AUGMENT_OPS = (
    "auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
    "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
    "translate_y",
)  # fmt: skip


def _affine(
    image: np.ndarray, linear: np.ndarray, offset: np.ndarray, fill: tuple[int, ...]
) -> np.ndarray:
    """uint8 [H, W, C] -> [H, W, C]: ``out(p) = image(linear @ p + offset)`` for every output
    point p = (x, y) in PIL's continuous coordinates (pixel centres at +0.5, as PIL's AFFINE
    transform takes them), bicubic (OpenCV's), points outside the image ``fill``."""
    cv2 = _cv2()
    height, width = image.shape[:2]
    image = np.ascontiguousarray(image)  # a flipped view has a negative stride
    # The same map between OpenCV's pixel coordinates (centres at integers).
    shift = offset + linear @ np.array([0.5, 0.5]) - 0.5
    matrix = np.concatenate([linear, shift[:, None]], axis=1)
    out = cv2.warpAffine(
        image,
        matrix,
        (width, height),
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=tuple(int(v) for v in fill),
    )
    return out.reshape(image.shape)


def _rand_augment_geometry(
    name: str, amount: float, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(linear [2, 2], offset [2]) of the output-to-input map of a geometric RandAugment op:
    rotate ``amount`` degrees anticlockwise about the centre, shear by ``amount``, translate by
    ``amount`` pixels."""
    if name == "rotate":
        phi = np.radians(amount)
        linear = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
        centre = np.array([width / 2, height / 2])
        return linear, centre - linear @ centre
    linear, offset = np.eye(2), np.zeros(2)
    if name == "shear_x":
        linear[0, 1] = amount
    elif name == "shear_y":
        linear[1, 0] = amount
    elif name == "translate_x":
        offset[0] = amount
    elif name == "translate_y":
        offset[1] = amount
    return linear, offset


# A geometric op's amount at level 1: degrees, shear, or translation as a fraction of the side.
_GEOMETRIC_STRENGTH = {
    "rotate": 30.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 0.45, "translate_y": 0.45
}  # fmt: skip


def rand_augment_op(
    image: np.ndarray, name: str, level: float, rng: np.random.Generator, fill
) -> np.ndarray:
    """One RandAugment op on uint8 RGB [H, W, 3] at ``level`` in [0, 1]: rotate up to 30
    degrees, shear up to 0.3, translate up to 0.45 of the side, enhance factors 1 +- 0.9 level
    (at least 0.1), posterize to 4 - 4 level bits, solarize above 256 (1 - level), solarize-add
    up to 110 below 128. Geometric ops resample bicubic and fill with ``fill``; the others are
    PIL's, as timm runs them."""
    from PIL import Image, ImageEnhance, ImageOps

    def signed(value: float) -> float:
        return -value if rng.random() < 0.5 else value

    if name in _GEOMETRIC_STRENGTH:
        height, width = image.shape[:2]
        side = {"translate_x": width, "translate_y": height}.get(name, 1)
        amount = signed(_GEOMETRIC_STRENGTH[name] * side * level)
        linear, offset = _rand_augment_geometry(name, amount, height, width)
        return _affine(image, linear, offset, fill)
    pil = Image.fromarray(image)
    if name == "auto_contrast":
        out = ImageOps.autocontrast(pil)
    elif name == "equalize":
        out = ImageOps.equalize(pil)
    elif name == "invert":
        out = ImageOps.invert(pil)
    elif name == "posterize":  # keep the top 4 - 4 level bits; 0 bits (level 1) is black
        mask = (0xFF << (8 - (4 - int(4 * level)))) & 0xFF
        out = pil.point([i & mask for i in range(256)] * len(pil.getbands()))
    elif name == "solarize":
        out = ImageOps.solarize(pil, 256 - int(256 * level))
    elif name == "solarize_add":
        add = int(110 * level)
        lut = [min(255, i + add) if i < 128 else i for i in range(256)]
        out = pil.point(lut * len(pil.getbands()))
    elif name in ("color", "contrast", "brightness", "sharpness"):
        enhance = getattr(ImageEnhance, name.capitalize())
        out = enhance(pil).enhance(max(0.1, 1.0 + signed(0.9 * level)))
    else:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {RAND_AUGMENT_OPS}")
    return np.asarray(out)


@op("rand_augment")
def rand_augment(
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    probability: float = 0.5,
    fill: tuple[int, int, int] = (124, 116, 104),
) -> Op:
    """RandAugment on uint8 RGB images: ``num_ops`` ops drawn uniformly with replacement from
    ``RAND_AUGMENT_OPS``, each applied with ``probability`` at a magnitude drawn from
    N(magnitude, magnitude_std) clipped to [0, 10] (timm's "rand-m9-mstd0.5-inc1" is the
    default; ``fill``: ImageNet's mean colour, as timm sets it)."""

    def fn(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError("rand_augment takes uint8 RGB images (put it before value_range)")
        for index in rng.integers(0, len(RAND_AUGMENT_OPS), num_ops):
            if rng.random() > probability:
                continue
            m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
            level = float(np.clip(m, 0.0, 10.0)) / 10.0
            image = rand_augment_op(image, RAND_AUGMENT_OPS[index], level, rng, fill)
        return example | {"image": image}

    return fn


@op("flip_lr")
def flip_lr(probability: float = 0.5) -> Op:
    def fn(example: Example, rng: np.random.Generator) -> Example:
        if rng.random() < probability:
            return example | {"image": example["image"][:, ::-1]}
        return example

    return fn


# RGB -> YIQ (NTSC): Y is luma, (I, Q) the chroma plane that a hue rotation turns.
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]]
)


def hue_rotation_matrix(degrees: float) -> np.ndarray:
    """[3, 3] RGB -> RGB matrix that rotates the hue by ``degrees`` and keeps the luma."""
    t = np.deg2rad(degrees)
    rotate = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return np.linalg.inv(_RGB_TO_YIQ) @ rotate @ _RGB_TO_YIQ


@op("random_hue")
def random_hue(max_degrees: float = 30.0) -> Op:
    """Rotates an RGB uint8 image's hue by a uniform angle in [-max_degrees, max_degrees] (luma
    kept, values clipped to [0, 255]): more colours from few photos."""

    def fn(example: Example, rng: np.random.Generator) -> Example:
        matrix = hue_rotation_matrix(rng.uniform(-max_degrees, max_degrees))
        image = np.asarray(example["image"], np.float32)
        if image.shape[-1] != 3:
            raise BadImageError(
                f"random_hue needs RGB images, got {image.shape} ({_where(example)})"
            )
        rotated = image @ matrix.T.astype(np.float32)
        return example | {"image": np.clip(np.round(rotated), 0, 255).astype(np.uint8)}

    return fn


# --- values and keys --------------------------------------------------------------------------------


@op("value_range")
def value_range(low: float = -1.0, high: float = 1.0) -> Op:
    """uint8 [0, 255] -> float32 [low, high]."""

    def fn(example: Example, rng: np.random.Generator) -> Example:
        image = np.asarray(example["image"], np.float32)
        return example | {"image": low + image * ((high - low) / 255.0)}

    return fn


@op("digit_segmentation")
def digit_segmentation(threshold: float = 0.5, binary: bool = False) -> Op:
    """A per-pixel class map from a digit and its label: ``segmentation`` [H, W] int32 is 0 where
    the (uint8) image is at most ``threshold`` * 255 (background) and label + 1 on the stroke
    (11 classes), or 1 on the stroke with ``binary`` (2 classes). Runs before ``value_range``."""

    def fn(example: Example, rng: np.random.Generator) -> Example:
        image = np.asarray(example["image"])
        if image.dtype != np.uint8:
            raise ValueError(f"{_where(example)}: digit_segmentation needs the uint8 image")
        stroke = image.max(axis=-1) > threshold * 255
        foreground = 1 if binary else int(example["label"]) + 1
        return example | {"segmentation": np.where(stroke, foreground, 0).astype(np.int32)}

    return fn


@op("keep")
def keep(*keys: str) -> Op:
    def fn(example: Example, rng: np.random.Generator) -> Example:
        missing = [k for k in keys if k not in example]
        if missing:
            raise KeyError(f"{_where(example)}: keep{keys} but the example lacks {missing}")
        return {k: example[k] for k in keys}

    return fn
