"""trime: TRIME (Zhong, Lei & Chen, EMNLP 2022) as a fairseq plugin.

Importing ``trime`` is cheap: it pulls in neither torch nor fairseq. The fairseq
components (criteria, archs, tasks) are registered by :func:`trime.plugin.register`,
which runs automatically when fairseq's option parser is imported (see
``trime/_autoload.py``) or when fairseq loads this directory with ``--user-dir``.
"""

import sys

__version__ = "0.1.0"

if "fairseq.options" in sys.modules:  # loaded through --user-dir: register now
    from trime.plugin import register as _register

    _register()
