"""When and how :mod:`trime.loss` runs its tile kernels through ``torch.compile`` (pure torch).

The kernels are plain torch functions handed over as an explicit registry (name ->
function); :func:`kernels` returns them eager or compiled for one call. With
``torch.compile`` (inductor: C++ on CPU, Triton on GPU) each kernel becomes one fused
loop; eagerly it runs as ordinary torch ops with the same results up to fp32 round-off.

The process-wide state (chosen mode, why compiling was switched off, the eager work done
so far in ``auto`` mode, the compiled functions) is the one :data:`STATE` object.
"""

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional

import torch

__all__ = ["CompileState", "Kernels", "STATE", "compile_mode", "kernels", "set_compile"]

_log = logging.getLogger(__name__)
COMPILE_ENV = "TRIME_COMPILE"
# "auto": compile when a call scores at least this many (query, key) pairs: below it
# the compile time cannot pay off, and eager runs are fast anyway ...
AUTO_MIN_PAIRS = 1 << 22
# ... or once the process's smaller calls have scored this many pairs eagerly: many small
# calls (evaluation scores one window at a time) repay the compile (~10 s) in the work ahead
AUTO_MIN_TOTAL_PAIRS = 1 << 29
_MODES = ("auto", "always", "never")
_ALIASES = {"1": "always", "true": "always", "on": "always", "0": "never", "false": "never", "off": "never"}


@dataclass
class CompileState:
    """Process-wide compile state."""

    mode: Optional[str] = None  # None: read $TRIME_COMPILE on first use
    broken: Optional[str] = None  # why compiling failed (then eager for the rest of the process)
    eager_pairs: int = 0  # pairs scored eagerly by calls that "auto" left uncompiled
    compiled: Dict[Callable, Callable] = field(default_factory=dict)  # eager kernel -> its torch.compile'd twin
    problems: Dict[str, Optional[str]] = field(default_factory=dict)  # device type -> why it cannot compile


STATE = CompileState()


def set_compile(mode: str) -> None:
    """Choose how the memory kernels run: ``"auto"`` (default), ``"always"`` or ``"never"``.

    ``auto`` compiles them with ``torch.compile`` (dynamic shapes, so no recompiles as N
    varies) for calls that score at least 4M (query, key) pairs, and for every call once
    the smaller ones have scored 512M pairs in all (evaluation), when a compiler is
    available (a C++ compiler on CPU, Triton on GPU). Without one, or if compiling
    fails, the eager kernels run and one warning is logged. ``$TRIME_COMPILE`` sets the
    initial mode (``auto``/``always``/``never``, also ``1``/``0``).
    """
    key = str(mode).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _MODES:
        raise ValueError(f"compile mode must be auto, always or never, got {key!r} (from ${COMPILE_ENV}?)")
    STATE.mode = key


def compile_mode() -> str:
    """The current mode of :func:`set_compile`."""
    if STATE.mode is None:
        set_compile(os.environ.get(COMPILE_ENV, "auto"))
    return STATE.mode


def compiler_problem(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot build kernels for ``device`` here, or None (looked up once per device type)."""
    if device.type not in STATE.problems:
        STATE.problems[device.type] = _find_compiler_problem(device)
    return STATE.problems[device.type]


def _find_compiler_problem(device: torch.device) -> Optional[str]:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
    if device.type != "cpu":
        return f"no compiled kernels for device {device.type}"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return f"no C++ compiler found ({cxx})"
    return None


def use_compiled(device: torch.device, pairs: int) -> bool:
    """Whether a call scoring about ``pairs`` (query, key) pairs on ``device`` runs compiled kernels."""
    mode = compile_mode()
    if mode == "never" or STATE.broken is not None:
        return False
    if mode == "auto" and pairs < AUTO_MIN_PAIRS and STATE.eager_pairs < AUTO_MIN_TOTAL_PAIRS:
        STATE.eager_pairs += pairs
        return False
    problem = compiler_problem(device)
    if problem is not None:
        disable_compile(problem)
        return False
    return True


def disable_compile(why: str) -> None:
    """Run eagerly for the rest of the process; the first reason is logged once."""
    if STATE.broken is None:
        STATE.broken = why
        _log.warning("trime.loss: memory kernels run eagerly (not compiled): %s", why)


def _compiled_call(fn: Callable) -> Callable:
    """``fn`` through its compiled twin, falling back to ``fn`` for good once compiling fails."""

    def call(*args):
        if STATE.broken is None:
            compiled = STATE.compiled.get(fn)
            if compiled is None:
                compiled = STATE.compiled[fn] = torch.compile(fn, dynamic=True)
            try:
                return compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                disable_compile(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
        return fn(*args)

    return call


class Kernels:
    """The kernels of one call, by name: the registry's functions, or their compiled twins."""

    def __init__(self, registry: Mapping[str, Callable], compiled: bool) -> None:
        self.compiled = compiled
        self._fns = {name: _compiled_call(fn) if compiled else fn for name, fn in registry.items()}

    def __getattr__(self, name: str) -> Callable:
        try:
            return self.__dict__["_fns"][name]
        except KeyError:
            raise AttributeError(f"no kernel {name!r}") from None


def kernels(registry: Mapping[str, Callable], device: torch.device, pairs: int) -> Kernels:
    """The registry's kernels for a call scoring about ``pairs`` pairs on ``device`` (compiled or eager)."""
    return Kernels(registry, use_compiled(device, pairs))
