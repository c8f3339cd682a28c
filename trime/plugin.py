"""Register trime's fairseq components (criteria, archs, tasks) exactly once.

Registration also installs :mod:`trime.fairseq_guard`: fairseq's known deprecation
warnings are silenced, and a training run that uses trime has its data-bin checked
before fairseq opens it.
"""

import os

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))
_registered = False


def register() -> None:
    """Import the modules whose decorators register trime with fairseq (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from trime.fairseq_guard import guard_option_parsing, silence_known_deprecations

    silence_known_deprecations()
    guard_option_parsing()
    import trime.criterions  # noqa: F401
    import trime.models  # noqa: F401
    import trime.tasks  # noqa: F401
