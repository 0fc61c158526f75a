"""ANS coding of integer codes with the `constriction` library: the coder the entropy-coded container uses.

A record's codes are coded with a categorical model made from their counts alone, which the container
stores beside the coded words, so decoding needs nothing else and gives back the same codes.
"""

from __future__ import annotations

import numpy as np

from compresslm.errors import MissingPackageError

INSTALL = "entropy coding needs constriction and zstandard: pip install 'compresslm[entropy]'"


def require_constriction():
    try:
        import constriction
    except ImportError:
        raise MissingPackageError(INSTALL) from None
    return constriction


def _model(counts: np.ndarray):
    constriction = require_constriction()
    counts = np.asarray(counts, dtype=np.float64)
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def ans_encode(symbols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`symbols` ANS-coded with a model made from `counts` alone (what a decoder is given): uint32 words."""
    coder = require_constriction().stream.stack.AnsCoder()
    coder.encode_reverse(np.asarray(symbols, dtype=np.int32), _model(counts))
    return coder.get_compressed()


def ans_decode(words: np.ndarray, counts: np.ndarray, count: int) -> np.ndarray:
    """The `count` symbols `ans_encode` coded into `words` with the same `counts`."""
    coder = require_constriction().stream.stack.AnsCoder(np.asarray(words, dtype=np.uint32))
    return coder.decode(_model(counts), count)
