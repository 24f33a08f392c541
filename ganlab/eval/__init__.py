"""Evaluation, in modules named by their job:

- protocol.py    the fixed protocol of a run (latents, real statistics, torch-fidelity calls), its
                 evaluation and hand-over signatures, and the Evaluator that scores a generator;
- extractors.py  which feature extractor evaluation uses: a registry of name -> builder, each
                 returning a typed `Extractor` record;
- encoder.py     the domain encoder: self-supervised on the training split, shared by content hash;
- dinov2.py      DINOv2 from a local weights file (torch-fidelity builds it only through torch.hub);
- compositing.py RGBA over a background: how every image reaches an extractor;
- validity.py    degradations and ranking statistics: does a feature space rank generators?

Imports point one way: compositing -> encoder -> dinov2 -> extractors -> protocol; validity beside.
"""
