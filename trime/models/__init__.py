"""trime's fairseq model architectures (registered on import)."""

from trime.models import archs  # noqa: F401
