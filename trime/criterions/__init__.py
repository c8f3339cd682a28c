"""trime's fairseq criteria (registered on import)."""

from trime.criterions import trime_ext_loss, trime_long_loss, trime_loss  # noqa: F401
