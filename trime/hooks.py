"""Capture TRIME's keys/queries: the input of the last decoder layer's FFN.

In fairseq's pre-norm transformer LM this is the output of the last layer's
``final_layer_norm``, i.e. exactly what enters ``fc1``, so a forward *pre*-hook on
``decoder.layers[-1].fc1`` yields it without forking the model. The captured tensor
keeps its autograd graph, so gradients flow into both queries and keys. A capture
entered through :meth:`FFNInputCapture.until_keys` ends the forward pass right there
(:class:`KeysCaptured`), for jobs that need only the keys (datastores).
"""

import weakref
from typing import Optional

from torch import Tensor, nn

from trime.errors import fail

_captures: "weakref.WeakKeyDictionary[nn.Module, FFNInputCapture]" = weakref.WeakKeyDictionary()


def last_ffn_layer(model: nn.Module) -> nn.Module:
    """The last decoder layer's first FFN projection, or a clear error if there is none."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0 or not hasattr(layers[-1], "fc1"):
        fail(
            f"model {type(model).__name__} has no decoder.layers[-1].fc1 to take TRIME keys from; "
            "use a fairseq transformer language model (e.g. --arch transformer_lm or transformer_lm_wiki103)"
        )
    return layers[-1].fc1


class KeysCaptured(Exception):
    """Raised by a capture that stops the forward pass once the keys are recorded (and swallowed on exit)."""


class FFNInputCapture:
    """Records the last FFN input of one forward pass, as (batch, time, dim)."""

    def __init__(self, fc1: nn.Module) -> None:
        self._active = self._stop = False
        self._captured: Optional[Tensor] = None
        self._handle = fc1.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, inputs) -> None:
        if self._active:
            self._captured = inputs[0]
            if self._stop:
                raise KeysCaptured

    def until_keys(self) -> "FFNInputCapture":
        """Enter as ``with capture.until_keys(): model(...)`` to skip everything after the key (last FFN, head)."""
        self._stop = True
        return self

    def __enter__(self) -> "FFNInputCapture":
        self._active, self._captured = True, None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stopped = self._stop and exc_type is KeysCaptured
        self._active = self._stop = False
        return stopped

    def pop(self) -> Tensor:
        """The captured representations as (batch, time, dim); fairseq layers run time-major."""
        if self._captured is None:
            fail("the last decoder layer's FFN did not run during the forward pass; cannot take TRIME keys")
        reps, self._captured = self._captured, None
        return reps.transpose(0, 1)

    def remove(self) -> None:
        self._handle.remove()


def ffn_input_capture(model: nn.Module) -> FFNInputCapture:
    """The (cached) capture attached to ``model``'s last FFN."""
    fc1 = last_ffn_layer(model)
    capture = _captures.get(fc1)
    if capture is None:
        capture = _captures[fc1] = FFNInputCapture(fc1)
    return capture
