"""Evaluation as ADM does it (openai/guided-diffusion evaluations): FID, sFID, Inception Score, precision, recall.

- metrics: the math as pure numpy functions (compute_statistics, frechet_distance, inception_score,
  precision_recall).
- npz: ADM's batch files (save_samples_npz, load_samples_npz, load_reference_batch).
- inception: the 2015-12-05 Inception-v3 via torch-fidelity, read out at pool_3, mixed_6/conv and the softmax.
- evaluate: `evaluate(ref, sample)`, the numbers of `disploss evaluate REF.npz SAMPLE.npz`.

Importing this package is light: torch, torch-fidelity and scipy are imported inside the functions that use them.
"""

from disploss.evaluation.evaluate import evaluate
from disploss.evaluation.inception import InceptionFeatureExtractor, InceptionFeatures, InceptionWeightsError
from disploss.evaluation.metrics import compute_statistics, frechet_distance, inception_score, precision_recall
from disploss.evaluation.npz import ReferenceBatch, load_reference_batch, load_samples_npz, save_samples_npz

__all__ = [
    "InceptionFeatureExtractor",
    "InceptionFeatures",
    "InceptionWeightsError",
    "ReferenceBatch",
    "compute_statistics",
    "evaluate",
    "frechet_distance",
    "inception_score",
    "load_reference_batch",
    "load_samples_npz",
    "precision_recall",
    "save_samples_npz",
]
