"""K-shot sampling per class, reproducible for a seed (the few-shot protocol of the CoOp papers)."""

from __future__ import annotations

import warnings

import numpy as np

from fedprompt.data.image_set import DataError


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Pick ``shots`` images per class, reproducibly for ``seed``.

    Each class draws from its own generator seeded by ``(seed, class)``, as a prefix of one
    random permutation, so the K-shot set of a class does not depend on other classes and the
    K-shot set is contained in the 2K-shot set for the same seed.

    Args:
        labels: Integer label of each image.
        shots: Images per class; 0 keeps every image.
        seed: Non-negative seed (the papers use 1, 2, 3).

    Returns:
        Sorted indices into ``labels``. A class with fewer than ``shots`` images contributes
        all of them, with a warning.

    Raises:
        DataError: If ``shots`` or ``seed`` is negative.
    """
    labels = np.asarray(labels).reshape(-1)
    if shots < 0 or seed < 0:
        raise DataError(
            f"few-shot sampling needs shots >= 0 and seed >= 0, got shots={shots}, seed={seed}."
        )
    if shots == 0:
        return np.arange(len(labels), dtype=np.int64)
    chosen = []
    short = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        if len(idx) < shots:
            short.append(f"class {int(label)} has {len(idx)}")
        order = np.random.default_rng([int(seed), int(label)]).permutation(idx)
        chosen.append(order[:shots])
    if short:
        warnings.warn(
            f"{shots}-shot sampling: {', '.join(short)} images; all of them are used.",
            stacklevel=2,
        )
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)
