"""trime fairseq tasks (registered on import)."""

from trime.tasks import trime_lm  # noqa: F401
