"""trime's fairseq criteria (registered on import)."""

from trime.criterions import trime_loss  # noqa: F401
