"""Register trime's fairseq components (criteria, archs, tasks) exactly once."""

import os

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))
_registered = False


def register() -> None:
    """Import the modules whose decorators register trime with fairseq (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    import trime.criterions  # noqa: F401
    import trime.models  # noqa: F401
    import trime.tasks  # noqa: F401
