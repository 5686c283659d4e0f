"""Class-conditional samples from a token generator, decoded and judged by a trained classifier.

For each class the evaluator samples ``samples_per_class`` token grids (KV-cached decoding with
the configured temperature, top-k, top-p and CFG scale), decodes them with the tokenizer run in
``tokenizer_workdir`` and reports

    {prefix}/class_accuracy   fraction of samples the classifier assigns to the requested class
    {prefix}/real_accuracy    the same classifier on the real eval images (its ceiling)
    {prefix}/classifier_fid   Fréchet distance of the classifier's pooled features, samples vs
                              the real eval images ("classifier-feature FID")
    {prefix}/fid              the standard FID: pytorch-fid's Inception-v3 pool features
                              (``inception_weights``, its .pth file), samples vs
                              ``fid_reference`` (an .npz of mu and sigma, e.g. ADM's ImageNet
                              reference batch) or, without it, vs the real eval images
    {prefix}/inception_score  the Inception Score of the samples (``is_splits`` splits)
    {prefix}/passes           forward passes per sampling call (n + m - 1 for NAR, n * m raster)
    {prefix}/images_per_sec   sampling + decoding throughput (compiled; every batch timed)

and writes ``{prefix}_samples.png``: one row per class. With a FlexTok tokenizer run the
generator is a GPT over its 1D tokens: ``num_tokens`` (default all) are sampled and decoded
with ``decode_steps`` Euler steps. The classifier is a ViT run's workdir
(e.g. configs/vit.py:tiny on the same images); ``classifier_range`` is the pixel range it was
trained on. Without ``classifier_workdir`` and ``inception_weights`` only the grid, passes
and throughput are produced. ``buckets``: the sampler's loop layout ("exact", True, False;
``vitok.models.nar.sample``: the same samples, a different compile time and speed).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok import runs
from vitok.config import REQUIRED
from vitok.evaluators import evaluator_options
from vitok.evaluators.fid import FeatureStats, fid_from_stats, frechet_distance
from vitok.evaluators.inception import InceptionFID, inception_score, reference_statistics
from vitok.evaluators.reconstruction import save_grid
from vitok.models.base import Tokenizer, pad_ids
from vitok.models.nar import sample
from vitok.models.vit import ViT
from vitok.registry import EVALUATORS


def _load_run(workdir: str, what: str, mesh):
    """A trained run's model (EMA params if kept), laid out on ``mesh`` (the generator's, so
    that one jit can take both)."""
    if not workdir:
        raise ValueError(f"the generation evaluator needs {what}")
    return runs.load_run(workdir, mesh).module()


class Classifier:
    """A trained ViT: images in [-1, 1] -> (logits [B, K], pooled features [B, D])."""

    def __init__(self, workdir: str, mesh, value_range: tuple[float, float] = (0.0, 1.0)):
        model = _load_run(workdir, "classifier_workdir", mesh)
        if not isinstance(model, ViT) or model.head is None:
            raise ValueError(f"{workdir!r} is not a ViT classifier run")
        self.graphdef, self.state = nnx.split(model)
        self.low, self.high = (float(v) for v in value_range)

        def run(state, images):
            vit = nnx.merge(self.graphdef, state)
            x = (images + 1) / 2 * (self.high - self.low) + self.low
            pooled = vit.features(x)
            return vit.head(pooled).astype(jnp.float32), pooled.astype(jnp.float32)

        self._run = jax.jit(run)

    def __call__(self, images: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self._run(self.state, images)
        return np.asarray(logits), np.asarray(features)


@EVALUATORS.register("generation")
class GenerationEvaluator:
    OPTIONS = {
        "prefix": "samples", "samples_per_class": 100, "batch_size": 100, "grid_columns": 10,
        "tokenizer_workdir": REQUIRED, "classifier_workdir": "", "classifier_range": (0, 1),
        "num_tokens": 0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0,
        "decode_steps": 10, "inception_weights": "", "fid_reference": "", "is_splits": 10,
        "buckets": "exact",
    }  # fmt: skip

    def __init__(self, config: Any, context: Any):
        self.config, self.context = config, context
        o = evaluator_options(config, self.OPTIONS)
        self.prefix = o["prefix"]
        self.per_class = int(o["samples_per_class"])
        self.batch_size = int(o["batch_size"])
        self.grid_columns = int(o["grid_columns"])
        shards = context.mesh.shape["data"] * context.mesh.shape["fsdp"]
        if self.batch_size % shards:
            raise ValueError(
                f"evaluator {self.prefix!r}: batch_size {self.batch_size} must be divisible by "
                f"the {shards} devices the batch is split over"
            )
        tokenizer = _load_run(o["tokenizer_workdir"], "tokenizer_workdir", context.mesh)
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(
                f"tokenizer_workdir {o['tokenizer_workdir']!r} holds a "
                f"{type(tokenizer).__name__}, not a tokenizer"
            )
        self.tok_def, self.tok_state = nnx.split(tokenizer)
        self.classifier = (
            Classifier(o["classifier_workdir"], context.mesh, tuple(o["classifier_range"]))
            if o["classifier_workdir"]
            else None
        )
        self.inception = (
            InceptionFID.from_file(o["inception_weights"]) if o["inception_weights"] else None
        )
        self.reference = reference_statistics(o["fid_reference"]) if o["fid_reference"] else None
        self.is_splits = int(o["is_splits"])
        num_tokens = int(o["num_tokens"]) or None
        options = dict(
            temperature=float(o["temperature"]),
            top_k=int(o["top_k"]),
            top_p=float(o["top_p"]),
            cfg_scale=float(o["cfg_scale"]),
            num_tokens=num_tokens,
            buckets=o["buckets"],
        )
        decode_options = {}
        if "steps" in tokenizer.decode_options:
            decode_options["steps"] = int(o["decode_steps"])
        ordered = tokenizer.ordered  # 1D tokens: decode the first k = num_tokens
        handle = context.model

        def generate(params, extra, tok_state, labels, rng):
            sample_rng, decode_rng = jax.random.split(rng)
            out = sample(handle.merge(params, extra), labels, sample_rng, **options)
            tok = nnx.merge(self.tok_def, tok_state)
            ids = out["tokens"]
            if ordered:
                ids = pad_ids(ids[:, : num_tokens or ids.shape[1]], tok.token_shape[0])
            images = tok.detokenize(ids, decode_rng, **decode_options)
            return jnp.clip(images, -1, 1), out["passes"]

        self._generate = jax.jit(generate)

    def samples(self, params: Any, extra: Any, seed: int = 0) -> dict:
        """Every class's samples: {"images": [K, per_class, H, W, C] in [-1, 1], "passes",
        "images_per_sec"}."""
        num_classes = self.context.model.merge(params, extra).num_classes
        labels = np.repeat(np.arange(num_classes, dtype=np.int32), self.per_class)

        def generate(i: int):
            batch = labels[i : i + self.batch_size]
            padded = np.concatenate([batch, np.zeros((self.batch_size - len(batch),), np.int32)])
            rng = jax.random.fold_in(jax.random.key(seed), i)
            out, passes = self._generate(params, extra, self.tok_state, padded, rng)
            return np.asarray(out)[: len(batch)], int(passes)

        generate(0)  # compile and warm up, so that the rate is the sampler's
        images, seconds = [], 0.0
        for i in range(0, len(labels), self.batch_size):
            t0 = time.perf_counter()
            out, passes = generate(i)
            seconds += time.perf_counter() - t0
            images.append(out)
        images = np.concatenate(images).reshape(num_classes, self.per_class, *out.shape[1:])
        return {"images": images, "passes": passes, "images_per_sec": len(labels) / seconds}

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        out = self.samples(params, extra)
        images = out["images"]
        p = self.prefix
        results = {
            f"{p}/passes": float(out["passes"]),
            f"{p}/images_per_sec": out["images_per_sec"],
        }
        if jax.process_index() == 0:
            os.makedirs(self.context.workdir, exist_ok=True)
            columns = min(self.grid_columns, images.shape[1])
            save_grid(
                os.path.join(self.context.workdir, f"{p}_samples.png"),
                (images[:, :columns] + 1) / 2,
            )
        if self.classifier is None and self.inception is None:
            return results
        k, n = images.shape[:2]
        flat = images.reshape(k * n, *images.shape[2:])
        if self.classifier is not None:
            requested = np.repeat(np.arange(k), n)
            fake, correct = FeatureStats(), 0
            for i in range(0, len(flat), self.batch_size):
                logits, features = self.classifier(flat[i : i + self.batch_size])
                correct += int((logits.argmax(-1) == requested[i : i + self.batch_size]).sum())
                fake.add(features)
            results[f"{p}/class_accuracy"] = correct / len(flat)
        if self.inception is not None:
            fake_pool, fake_logits = FeatureStats(), []
            for i in range(0, len(flat), self.batch_size):
                pool, logits = self._inception(flat[i : i + self.batch_size])
                fake_pool.add(pool)
                fake_logits.append(logits)
            fake_logits = np.concatenate(fake_logits)
            results[f"{p}/inception_score"] = inception_score(
                fake_logits, min(self.is_splits, len(fake_logits))
            )
        real, real_pool, real_correct, real_count = FeatureStats(), FeatureStats(), 0, 0
        if self.classifier is not None or (self.inception is not None and self.reference is None):
            for batch in self.context.eval_batches(self.config):
                keep = np.asarray(batch["mask"]) > 0
                host = np.asarray(batch["image"])
                if self.classifier is not None:
                    logits, features = self.classifier(host)
                    real.add(features[keep])
                    label = np.asarray(batch["label"])
                    real_correct += int((logits.argmax(-1) == label)[keep].sum())
                    real_count += int(keep.sum())
                if self.inception is not None and self.reference is None:
                    real_pool.add(self._inception(host)[0][keep])
        if self.classifier is not None:
            results[f"{p}/real_accuracy"] = real_correct / max(real_count, 1)
            results[f"{p}/classifier_fid"] = fid_from_stats(real, fake)
        if self.inception is not None:
            reference = self.reference or real_pool.mean_cov()
            results[f"{p}/fid"] = frechet_distance(*reference, *fake_pool.mean_cov())
        return results

    def _inception(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host images [n <= batch_size, H, W, C] -> (pool [n, 2048], logits [n, 1008]),
        padded to one batch shape so the network compiles once."""
        n = len(images)
        padded = np.zeros((self.batch_size, *images.shape[1:]), np.float32)
        padded[:n] = images
        pool, logits = self.inception.pool_and_logits(padded)
        return np.asarray(pool)[:n], np.asarray(logits)[:n]
