"""Register trime with fairseq the first time ``fairseq.options`` is imported.

``trime-fairseq-autoload.pth`` (installed into site-packages) imports this module at
interpreter start-up. It only adds a meta-path finder: nothing heavy is imported
until some program imports ``fairseq.options`` (``fairseq-train``,
``fairseq-eval-lm`` ...), at which point :func:`trime.plugin.register` runs, so
``fairseq-train --criterion trime_loss`` works without ``--user-dir``.
Set ``TRIME_NO_AUTOLOAD=1`` to switch it off.
"""

import importlib.abc
import os
import sys

_WATCHED = "fairseq.options"


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        from trime.plugin import register

        register()


class _FairseqOptionsWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        sys.meta_path.remove(self)  # one shot; also avoids recursion below
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Add the watcher once (no-op if disabled or fairseq.options is already loaded)."""
    if os.environ.get("TRIME_NO_AUTOLOAD"):
        return
    if _WATCHED in sys.modules:
        from trime.plugin import register

        register()
        return
    if not any(isinstance(f, _FairseqOptionsWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _FairseqOptionsWatcher())


install()
