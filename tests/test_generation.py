"""The generators' pipeline: tokenizer -> codes on disk -> sharded generator training ->
samples decoded and judged; and the GPT over FlexTok's 1D tokens."""

import json
import os

import jax
import numpy as np
import pytest
from helpers import short_run, small_vit_config

pytestmark = pytest.mark.slow  # trains and tokenizes end to end


def _small_tokenizer_config():
    from configs import vae

    c = short_run(vae.get_config("mnist_fsq"), steps=3, batch_size=16)
    c.model.width, c.model.depth, c.model.num_heads = 32, 1, 2
    c.evals.recon.max_examples = 32
    c.evals.recon.batch_size = 32
    c.peak_flops_per_device = 1e9
    return c


@pytest.fixture(scope="module")
def digit_codes(tmp_path_factory):
    """A (tiny, briefly trained) tokenizer run and the codes it writes for both splits."""
    from vitok import train
    from vitok.tools import extract_codes

    root = tmp_path_factory.mktemp("tokens")
    one_device = jax.devices()[:1]  # the tokenizer only feeds the tests; sharding is tested below
    train.train_and_evaluate(_small_tokenizer_config(), str(root / "tokenizer"), one_device)
    out = str(root / "codes_{split}.npz")
    extract_codes.main(["--workdir", str(root / "tokenizer"), "--out", out, "--batch_size", "500"])
    return root, out


def test_extracted_codes_are_the_tokenizers_codes_of_every_digit(digit_codes):
    from vitok.data.sources import CodesSource, Mnist5kSource
    from vitok.inference import Tokenizer

    root, out = digit_codes
    test = CodesSource(path=out, split="test")
    digits = Mnist5kSource(split="test")
    assert len(test) == len(digits) == 1000 and len(CodesSource(path=out, split="train")) == 4000
    assert test[0]["codes"].shape == (7, 7) and test[0]["codes"].dtype == np.int32
    np.testing.assert_array_equal([test[i]["label"] for i in range(50)], digits.labels[:50])
    tokenizer = Tokenizer.from_workdir(str(root / "tokenizer"))
    images = np.stack([digits[i]["image"] for i in range(8)]).astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(tokenizer.tokenize(images), [test[i]["codes"] for i in range(8)])


def test_codes_that_do_not_fit_the_generator_are_refused_before_training(digit_codes):
    from configs import nar
    from vitok.tasks.generation import GenerationTask

    _, codes = digit_codes
    for field, value, message in [
        ("vocab_size", 100, "256-entry codebook"),
        ("grid", (8, 8), "the codes are"),
        ("num_classes", 5, "labels go up to 9"),
    ]:
        c = nar.get_config("digits_nar")
        c.data.path = codes
        c.model[field] = value
        with pytest.raises(ValueError, match=message):
            GenerationTask(c)


def test_codes_source_names_a_missing_or_corrupt_file(tmp_path):
    from vitok.data.sources import CodesSource

    with pytest.raises(FileNotFoundError, match="extract_codes"):
        CodesSource(path=str(tmp_path / "none_{split}.npz"), split="train")
    bad = tmp_path / "bad_train.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a codes file"):
        CodesSource(path=str(tmp_path / "bad_{split}.npz"), split="train")


def test_generator_trains_sharded_and_its_samples_are_judged(digit_codes, tmp_path):
    """NAR on the 8-device mesh (data 4 x fsdp 2) on real codes: the loss falls, parameters
    are sharded, and the generation evaluator decodes, classifies and grids the samples."""
    from configs import nar
    from vitok import train

    root, codes = digit_codes
    classifier = str(tmp_path / "classifier")
    train.train_and_evaluate(
        small_vit_config(total_steps=2, eval_every=2), classifier, jax.devices()[:1]
    )
    c = short_run(nar.get_config("digits_nar"), steps=12, batch_size=32)
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 1, 2, 64
    c.data.path = codes
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 1
    c.mesh.data, c.mesh.fsdp = 4, 2
    s = c.evals.samples
    s.tokenizer_workdir = str(root / "tokenizer")
    s.classifier_workdir = classifier
    s.samples_per_class, s.batch_size, s.grid_columns = 2, 16, 2  # 20 samples, 2 batches
    s.max_examples = 64
    s.inception_weights, s.fid_reference = _random_fid_files(tmp_path)
    s.is_splits = 2
    s.buckets = False  # one loop body to compile; the samples are the same in every layout
    workdir = str(tmp_path / "nar")
    final = train.train_and_evaluate(c, workdir)

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    assert final["samples/passes"] == 13  # 7 + 7 - 1
    assert os.path.exists(os.path.join(workdir, "samples_samples.png"))
    _check_judgement(c, workdir, classifier, final)


def _random_fid_files(tmp_path) -> tuple[str, str]:
    """pytorch-fid's Inception weights file with seeded random values (the real file's names
    and shapes), and reference statistics (mu, sigma of 100 random pool features) in its
    .npz format."""
    from tests.official_layouts import inception_state_dict, write_torch_file

    golden = np.load(os.path.join(os.path.dirname(__file__), "golden", "inception_fid.npz"))
    weights = str(tmp_path / "pt_inception.pth")
    write_torch_file(weights, inception_state_dict(json.loads(str(golden["shapes"])), 0))
    features = np.random.default_rng(0).gamma(1.0, 0.3, (100, 2048))
    reference = str(tmp_path / "reference.npz")
    np.savez(reference, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    return weights, reference


def _check_judgement(config, workdir, classifier_dir, final):
    """The evaluator's class accuracy, classifier-feature FID, standard FID and Inception
    Score, recomputed from the same samples by a second path: the classifier and the
    Inception network loaded on their own, the count, the Frechet distance and the score in
    numpy."""
    import scipy.linalg
    import scipy.special

    from vitok import runs, sharding
    from vitok.data import pipeline
    from vitok.evaluators.generation import GenerationEvaluator
    from vitok.evaluators.inception import InceptionFID
    from vitok.inference import load_model
    from vitok.train import EvalContext

    mesh = sharding.make_mesh(config.mesh)
    rules = runs.sharding_rules(config)
    run = runs.load_run(workdir, mesh)
    context = EvalContext(config, run.model, mesh, rules, os.path.join(workdir, "again"))
    evaluator = GenerationEvaluator(config.evals.samples, context)
    images = evaluator.samples(run.params, run.extra)["images"]  # [classes, per_class, H, W, C]
    classes, per_class = images.shape[:2]
    flat = images.reshape(classes * per_class, *images.shape[2:])

    vit = load_model(classifier_dir)
    to_input = lambda x: (np.asarray(x) + 1) / 2  # noqa: E731  classifier_range (0, 1)
    fake = np.asarray(vit.features(to_input(flat)))
    predicted = np.asarray(vit.head(vit.features(to_input(flat)))).argmax(-1)
    accuracy = np.mean(predicted == np.repeat(np.arange(classes), per_class))
    assert final["samples/class_accuracy"] == pytest.approx(accuracy, abs=1e-9)

    real = []
    for batch in pipeline.eval_batches(
        config.evals.samples.data,
        global_batch_size=16,
        max_examples=config.evals.samples.max_examples,
    ):
        keep = batch["mask"] > 0
        real.append(np.asarray(vit.features(to_input(batch["image"])))[keep])
    real = np.concatenate(real).astype(np.float64)
    fake = fake.astype(np.float64)
    assert len(real) == config.evals.samples.max_examples
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(cov_r @ cov_f).real
    fid = np.sum((mu_r - mu_f) ** 2) + np.trace(cov_r + cov_f - 2 * root)
    assert final["samples/classifier_fid"] == pytest.approx(fid, rel=1e-3)

    inception = InceptionFID.from_file(config.evals.samples.inception_weights)
    pool, logits = (
        np.asarray(a, np.float64) for a in inception.pool_and_logits(flat.repeat(3, -1))
    )
    with np.load(config.evals.samples.fid_reference) as f:
        mu_r, cov_r = f["mu"], f["sigma"]
    cov_f = np.cov(pool, rowvar=False)
    root = scipy.linalg.sqrtm(cov_r @ cov_f).real
    fid = np.sum((mu_r - pool.mean(0)) ** 2) + np.trace(cov_r + cov_f - 2 * root)
    assert final["samples/fid"] == pytest.approx(fid, rel=1e-3)
    scores = []
    for part in np.split(scipy.special.softmax(logits, axis=1), 2):
        kl = (part * (np.log(part) - np.log(part.mean(0)))).sum(1)
        scores.append(np.exp(kl.mean()))
    assert final["samples/inception_score"] == pytest.approx(np.mean(scores), rel=1e-4)
