"""Memory levels and the external memory's coin, shared by both front-ends (no torch, fairseq or transformers).

:data:`MEMORIES` are the memory levels, in order: ``none``; ``local``, earlier tokens of the
same segment; ``long``, every earlier token of consecutive segments; ``external``, the other
segments of the global batch in training, the kNN datastore at evaluation (where the levels
are cumulative). Subsets are slices of it, so that a name lives in one place.

In training with external memory the local memory is switched off with probability
``ratio`` per forward. :func:`local_off_coin` is that forward's uniform number: a pure
function of (seed, rank, step, micro-batch) hashed with numpy's ``SeedSequence``, so a
resumed run draws exactly what an uninterrupted one draws, and the fairseq criterion
(``trime_ext_loss``) and ``trime-hf-train`` draw the same coins for the same inputs.
"""

import numpy as np

MEMORIES = ("none", "local", "long", "external")
# the levels whose memory reaches beyond the current segment (need --mem-size)
CROSS_SEGMENT_MEMORIES = MEMORIES[MEMORIES.index("long") :]
# SeedSequence entropy must be non-negative: seeds are taken modulo this
_SEED_MODULUS = 2**63


def local_off_coin(seed: int, rank: int, step: int, micro: int) -> float:
    """The uniform [0, 1) number of forward ``micro`` of training step ``step`` on ``rank``; pure in its inputs."""
    return float(np.random.default_rng([int(seed) % _SEED_MODULUS, int(rank), int(step), int(micro)]).random())


def local_off(seed: int, rank: int, step: int, micro: int, ratio: float) -> bool:
    """True (local memory off for this forward) with probability ``ratio``: ``local_off_coin(...) < ratio``."""
    return local_off_coin(seed, rank, step, micro) < ratio
