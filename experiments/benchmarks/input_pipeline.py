"""Input throughput of the ImageNet training transform: vitok's grain pipeline beside tf.data.

    python experiments/benchmarks/input_pipeline.py [--files 300] [--images 400]

Makes ImageNet-sized JPEGs from the photos scikit-image ships (500x375 and 375x500, quality
90) in a folder and in a tfds ArrayRecord dataset, then times, each in its own process pinned
to its CPU cores, decode + Inception crop to 224 (bicubic) + flip + RandAugment (2 ops, m9,
magnitude std 0.5) to uint8:

* vitok, one core: the folder source and the tfds source (``encoded=True``), threads;
* vitok with 1 and 2 worker processes (``config.data.worker_processes``) on 1 and 2 cores;
* tf.data the way big_vision does it, one core: ``tf.image.decode_and_crop_jpeg`` of a
  ``sample_distorted_bounding_box`` (area 0.08-1, aspect 3/4-4/3), ``tf.image.resize``,
  ``random_flip_left_right`` and the TF Model Garden's ``RandAugment`` (the TPU RandAugment
  that big_vision's autoaugment also derives from; at magnitude std 0, see below). It needs, installed beside tensorflow-cpu:
  ``pip install --no-deps tf-models-official==2.20.0 tf-keras==2.21.0 gin-config pycocotools
  opencv-python-headless``.

Images per second are medians over three timed passes after a warm-up. The last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

PP = "inception_crop(224)|flip_lr|rand_augment(2, 9, magnitude_std=0.5)"


def make_jpegs(root: str, count: int) -> str:
    """``count`` JPEGs (three in four landscape 500x375, else portrait) under root/jpegs/cN/."""
    from PIL import Image

    from vitok.data.sources import PHOTO_SPLITS, _photo

    folder = os.path.join(root, "jpegs")
    if os.path.isdir(folder) and sum(len(f) for _, _, f in os.walk(folder)) == count:
        return folder
    photos = [_photo(n) for split in PHOTO_SPLITS.values() for n in split]
    for i in range(count):
        rng = np.random.default_rng(i)
        photo = photos[i % len(photos)]
        size = (375, 500) if i % 4 == 3 else (500, 375)  # (width, height)
        h, w = photo.shape[:2]
        scale = min(w / size[0], h / size[1]) * rng.uniform(0.6, 1.0)
        cw, ch = int(size[0] * scale), int(size[1] * scale)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[top : top + ch, left : left + cw]).resize(size, Image.BICUBIC)
        os.makedirs(os.path.join(folder, f"c{i % 10}"), exist_ok=True)
        crop.save(os.path.join(folder, f"c{i % 10}", f"{i:05d}.jpg"), quality=90)
    return folder


def make_tfds(root: str, folder: str) -> str:
    """The same files, bytes unchanged, as a tfds ArrayRecord dataset ``vitok_jpegs``."""
    import tensorflow_datasets as tfds

    files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names)

    class VitokJpegs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"image": tfds.features.Image(encoding_format="jpeg"), "label": np.int64}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, path in enumerate(files):  # a path is stored as its bytes, not re-encoded
                yield i, {"image": path, "label": int(os.path.basename(os.path.dirname(path))[1:])}

    data_dir = os.path.join(root, "tfds")
    VitokJpegs(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def _median_rate(next_batch, batch: int, images: int) -> float:
    next_batch()  # warm-up (and worker start-up)
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(max(1, images // batch)):
            next_batch()
        rates.append(max(1, images // batch) * batch / (time.perf_counter() - t))
    return float(np.median(rates))


def measure_vitok(data: dict, workers: int, images: int) -> float:
    from vitok.data import pipeline

    config = data | {"pp": PP, "num_threads": 1, "prefetch": 16, "worker_processes": workers}
    it = iter(pipeline.train_dataset(config, global_batch_size=16, seed=0))
    return _median_rate(lambda: next(it), 16, images)


def measure_tfdata(folder: str, images: int) -> float:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from official.vision.ops import augment

    # magnitude_std=0 here: Model Garden's Posterize and Solarize fail on the tensor-valued
    # level that magnitude noise makes (uint8 vs int32); the noise changes no op's cost.
    randaugment = augment.RandAugment(num_layers=2, magnitude=9, magnitude_std=0.0)
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names)

    def transform(path):
        data = tf.io.read_file(path)
        shape = tf.image.extract_jpeg_shape(data)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape,
            tf.zeros([0, 0, 4], tf.float32),
            area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3),
            min_object_covered=0,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        image = tf.image.resize(image, (224, 224), method="bicubic")
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        image = tf.image.random_flip_left_right(image)
        return randaugment.distort(image)

    ds = tf.data.Dataset.from_tensor_slices(files).repeat().map(transform, num_parallel_calls=1)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    ds = ds.with_options(options).batch(16).prefetch(2)
    it = iter(ds)
    return _median_rate(lambda: next(it), 16, images)


def run_pinned(cores: int, *args: str) -> float:
    """Run this file's ``--measure`` in a child process pinned to the first ``cores`` CPUs."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < cores:
        raise SystemExit(f"input_pipeline: {cores} cores asked, {len(available)} available")
    command = [sys.executable, __file__, "--measure", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        ["taskset", "-c", ",".join(map(str, available[:cores])), *command],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"input_pipeline: measuring {args} failed: {tail}")
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="workdirs/bench_input")
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--images", type=int, default=400, help="images per timed pass")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        kind, *rest = args.measure
        if kind == "tfdata":
            rate = measure_tfdata(rest[0], args.images)
        else:
            data = json.loads(rest[0])
            rate = measure_vitok(data, int(rest[1]), args.images)
        print(rate)
        return {}
    os.makedirs(args.root, exist_ok=True)
    folder = make_jpegs(args.root, args.files)
    data_dir = make_tfds(args.root, folder)
    folder_data = json.dumps({"source": "folder", "path": folder})
    tfds_data = json.dumps(
        {"source": "tfds", "name": "vitok_jpegs", "data_dir": data_dir, "encoded": True}
    )
    result = {
        "vitok_images_per_sec_per_core": run_pinned(1, "vitok", folder_data, "0"),
        "vitok_tfds_images_per_sec_per_core": run_pinned(1, "vitok", tfds_data, "0"),
        "tfdata_images_per_sec_per_core": run_pinned(1, "tfdata", folder),
        "vitok_1_worker_images_per_sec": run_pinned(1, "vitok", folder_data, "1"),
        "vitok_2_workers_images_per_sec": run_pinned(2, "vitok", folder_data, "2"),
    }
    result["ratio"] = (
        result["vitok_images_per_sec_per_core"] / result["tfdata_images_per_sec_per_core"]
    )
    result["worker_scaling_2_over_1"] = (
        result["vitok_2_workers_images_per_sec"] / result["vitok_1_worker_images_per_sec"]
    )
    result = {k: round(v, 3) for k, v in result.items()}
    result |= {"files": args.files, "transform": PP, "image_size": "500x375 / 375x500 q90"}
    with open(os.path.join(os.path.dirname(__file__), "input_pipeline.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
