"""A real (tiny) tfds dataset, prepared as ArrayRecord, read back through grain without TF."""

import numpy as np
import pytest

from vitok.data import ops, pipeline, sources

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("tensorflow", reason="preparing a tfds dataset needs tensorflow-cpu")

IMAGES = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)


class VitokTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(16, 16, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(range(8)),
            "test": self._generate_examples(range(8, 12)),
        }

    def _generate_examples(self, indices):
        for i in indices:
            yield i, {"image": IMAGES[i], "label": i % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    VitokTinyImages(data_dir=directory, file_format="array_record").download_and_prepare()
    return directory


def test_tfds_source_reads_prepared_dataset(data_dir):
    src = sources.TfdsSource(name="vitok_tiny_images", split="test", data_dir=data_dir)
    assert len(src) == 4
    got = {int(src[i]["label"]): src[i]["image"] for i in range(len(src))}
    seen = sorted(src[i]["image"].tobytes() for i in range(len(src)))
    assert seen == sorted(IMAGES[i].tobytes() for i in range(8, 12))  # lossless PNG round trip
    assert set(got) == {0, 1, 2}


def test_encoded_tfds_images_are_the_stored_bytes_that_decode_to_the_same_arrays(data_dir):
    decoded = sources.TfdsSource(name="vitok_tiny_images", split="test", data_dir=data_dir)
    encoded = sources.TfdsSource(
        name="vitok_tiny_images", split="test", data_dir=data_dir, encoded=True
    )
    decode = ops.parse("decode(channels=3)")
    for i in range(len(decoded)):
        data = encoded[i]["image"]
        assert isinstance(data, bytes) and data.startswith(b"\x89PNG")
        np.testing.assert_array_equal(decode(encoded[i], None)["image"], decoded[i]["image"])


def test_tfds_pipeline_batches(data_dir):
    config = {
        "source": "tfds",
        "name": "vitok_tiny_images",
        "data_dir": data_dir,
        "pp": "decode|random_crop(12)|value_range(0, 1)",
    }
    batch = next(iter(pipeline.train_dataset(config, global_batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 12, 12, 3) and batch["label"].shape == (4,)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_missing_tfds_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build vitok_tiny_images"):
        sources.TfdsSource(name="vitok_tiny_images", split="train", data_dir=str(tmp_path))
    assert not any(tmp_path.rglob("*.tfrecord*")) and not any(tmp_path.rglob("*.array_record*"))
