"""Evaluation, in modules named by their job:

- protocol.py     the fixed protocol of a run (latents, real statistics, torch-fidelity calls), its
                  evaluation and hand-over signatures, and the Evaluator that scores a generator;
- extractors.py   which feature extractor evaluation uses (`auto` decided for the device): a registry
                  of name -> builder, each returning a typed `Extractor` record;
- encoder.py      the domain encoder: self-supervised on the training split, cached by content hash;
- encoder_store.py  the team's copy of an encoder in the MLflow store, claimed once per key;
- dinov2.py       DINOv2 from a local weights file (torch-fidelity builds it only through torch.hub);
- compositing.py  RGBA over a background: how every image reaches an extractor;
- stats.py        FID / KID statistics in torch (a feature-statistics accumulator);
- copies.py       the copy check: generated images nearer a training image than held-out ones are;
- validity.py     degradations and ranking statistics: does a feature space rank generators?

Imports point one way: compositing, stats, copies and dinov2 import nothing of ganlab's evaluation;
encoder_store -> encoder -> extractors -> protocol; validity beside. Outside the package, evaluation
reads data, checkpoint, generator, metrics and the MLflow store's helpers (ganlab/store.py), never
tracking or training.
"""
