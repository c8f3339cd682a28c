"""TRIME's keys and queries: the input of the last decoder layer's feed-forward block, after its norm.

One capture, :class:`KeyCapture`, serves both front-ends; they differ in where that
module is and in the layout of its input:

- fairseq (:func:`fairseq_key_module`): in the pre-norm transformer LM the output of the
  last layer's ``final_layer_norm`` is exactly what enters ``decoder.layers[-1].fc1``;
  fairseq layers run time-major, (T, B, d).
- Hugging Face (:func:`hf_key_module`): the input of the last decoder layer's MLP module.
  GPT-2 (and GPT-J, Falcon, Bloom, ...): ``ln_2`` -> ``mlp``; Llama, Mistral, Qwen2:
  ``post_attention_layernorm`` -> ``mlp``; GPT-NeoX / Pythia: ``post_attention_layernorm``
  -> ``mlp`` (with ``use_parallel_residual`` the MLP reads the norm of the layer *input*,
  still the norm's output); OPT: ``final_layer_norm`` -> ``fc1`` (no ``mlp`` module; OPT
  flattens the batch to (B*T, d) before it). Another module can be named explicitly
  (``key_module="model.layers.3.mlp"``, ``--key-module`` on the command line). Naming the
  output head (``lm_head``, GPT-NeoX's ``embed_out``: whatever ``get_output_embeddings()``
  is) takes the head's input, the final normed hidden state: it is read from the base
  model's output, so it is there also when only the base model runs (evaluation).

A forward pre-hook yields the input without forking the model. It is registered when the
``with`` block is entered and removed on exit, so nothing stays attached to the model.
The captured tensor keeps its autograd graph, so gradients flow into queries and keys.
With ``stop=True`` the forward pass ends once the keys are recorded (:class:`KeysCaptured`,
swallowed by the ``with`` block), for jobs that need only the keys (datastores).
Nothing here imports fairseq or transformers.
"""

from typing import Optional, Tuple

from torch import Tensor, nn

from trime.errors import fail

# the module list of decoder layers, as the supported HF architectures name it (first match wins)
HF_LAYER_LISTS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
# the feed-forward block inside an HF decoder layer, in order of preference
HF_FFN_NAMES = ("mlp", "fc1")
KEY_MODULE_FLAG = "key_module='NAME' (trime-hf-train / trime-eval --key-module NAME)"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP/accelerate wrappers (``.module``) and peft's ``PeftModel``, else ``model`` itself."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
            model = model.get_base_model()  # peft: its LoRA layers sit inside the HF model, hooks there see them
        else:
            return model


def fairseq_key_module(model: nn.Module) -> Tuple[str, nn.Module]:
    """(dotted name, module) of a fairseq LM's keys: the last decoder layer's ``fc1``, or a one-line error."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0 or not hasattr(layers[-1], "fc1"):
        fail(
            f"model {type(model).__name__} has no decoder.layers[-1].fc1 to take TRIME keys from; "
            "use a fairseq transformer language model (e.g. --arch transformer_lm or transformer_lm_wiki103)"
        )
    return f"decoder.layers.{len(layers) - 1}.fc1", layers[-1].fc1


def hf_decoder_layers(model: nn.Module) -> Tuple[Optional[str], Optional[nn.ModuleList]]:
    """(dotted name, module list) of the model's non-empty decoder layer list, or (None, None)."""
    for name in HF_LAYER_LISTS:
        try:
            layers = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return name, layers
    return None, None


def hf_key_module(
    model: nn.Module, key_module: Optional[str] = None, origin: str = "key_module"
) -> Tuple[str, nn.Module]:
    """(dotted name, module) of a Hugging Face causal LM's keys: the last decoder layer's MLP by default.

    ``key_module`` names another submodule of the (unwrapped) model; ``origin`` says where that
    name came from in messages (default ``key_module``). Fails with one line naming what was
    looked for and the option to select another module.
    """
    model = unwrap_model(model)
    kind = type(model).__name__
    if key_module:
        try:
            return key_module, model.get_submodule(key_module)
        except AttributeError:
            fail(f"{origin} {key_module!r} is not a submodule of {kind}; name one of model.named_modules()")
    layers_name, layers = hf_decoder_layers(model)
    if layers is None:
        fail(
            f"unsupported architecture {kind}: found no decoder layer list ({', '.join(HF_LAYER_LISTS)}) to take "
            f"TRIME keys from; pass {KEY_MODULE_FLAG} naming the module whose input are the keys"
        )
    last = len(layers) - 1
    for ffn in HF_FFN_NAMES:
        module = getattr(layers[last], ffn, None)
        if isinstance(module, nn.Module):
            return f"{layers_name}.{last}.{ffn}", module
    fail(
        f"unsupported architecture {kind}: its last decoder layer {layers_name}.{last} has no "
        f"{' or '.join(HF_FFN_NAMES)} module to take TRIME keys from; pass {KEY_MODULE_FLAG}, "
        f"e.g. key_module='{layers_name}.{last}.<feed-forward module>'"
    )


class KeysCaptured(Exception):
    """Raised by a ``stop=True`` capture once the keys are recorded, ending the forward pass (swallowed on exit)."""


def hf_head_input_source(model: nn.Module, module: nn.Module) -> Optional[nn.Module]:
    """The base model whose output is ``module``'s input when ``module`` is the model's output head, else None.

    An HF causal LM applies its head to the base model's ``last_hidden_state`` (the final
    norm's output), so that output is the head's input, also when only the base model runs.
    """
    model = unwrap_model(model)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    base = getattr(model, "base_model", None)
    if head is None or module is not head or not isinstance(base, nn.Module) or base is model:
        return None
    return base


class KeyCapture:
    """Context manager recording the key module's input during one forward pass.

    >>> with KeyCapture.hf(model) as capture:  # or KeyCapture.fairseq(model)
    ...     model(input_ids)
    >>> keys = capture.keys(input_ids.shape)  # (B, T, d), graph kept

    ``time_major``: the module's input is (T, B, d) (fairseq). ``stop``: end the forward
    pass once the keys are recorded; nothing after the key module runs. ``output_of``: take
    the keys from this module's output (its first element) instead of ``module``'s input
    (the HF output head: :func:`hf_head_input_source`).
    """

    def __init__(self, name: str, module: nn.Module, *, time_major: bool = False, stop: bool = False,
                 output_of: Optional[nn.Module] = None) -> None:
        self.name, self.module = name, module
        self.time_major, self.stop = time_major, stop
        self.output_of = output_of
        self._captured: Optional[Tensor] = None
        self._handle = None

    @classmethod
    def fairseq(cls, model: nn.Module, *, stop: bool = False) -> "KeyCapture":
        """The capture of a fairseq transformer LM (:func:`fairseq_key_module`, time-major)."""
        return cls(*fairseq_key_module(model), time_major=True, stop=stop)

    @classmethod
    def hf(cls, model: nn.Module, key_module: Optional[str] = None, *, stop: bool = False) -> "KeyCapture":
        """The capture of a Hugging Face causal LM (:func:`hf_key_module`); ``model`` may be DDP- or peft-wrapped.

        The output head as ``key_module`` is read from the base model's output (:func:`hf_head_input_source`).
        """
        name, module = hf_key_module(model, key_module)
        return cls(name, module, stop=stop, output_of=hf_head_input_source(model, module))

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._captured = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        if self.stop:
            raise KeysCaptured

    def _output_hook(self, module: nn.Module, args: tuple, output) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        self._captured = hidden if hidden is not None else output if isinstance(output, Tensor) else output[0]
        if self.stop:
            raise KeysCaptured

    def __enter__(self) -> "KeyCapture":
        self._captured = None
        if self.output_of is not None:
            self._handle = self.output_of.register_forward_hook(self._output_hook)
        else:
            self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return self.stop and exc_type is KeysCaptured

    def keys(self, batch_shape: Optional[Tuple[int, int]] = None) -> Tensor:
        """The captured input as (B, T, d); ``batch_shape`` (B, T) un-flattens a (B*T, d) input (OPT) and is checked."""
        captured = self._captured
        if captured is None:
            fail(f"the key module {self.name} did not run during the forward pass; cannot take TRIME keys")
        if self.time_major:
            captured = captured.transpose(0, 1)
        if batch_shape is not None:
            batch, seq_len = int(batch_shape[0]), int(batch_shape[1])
            if captured.dim() == 2 and captured.shape[0] == batch * seq_len:
                captured = captured.view(batch, seq_len, -1)
            if captured.shape[:2] != (batch, seq_len):
                fail(
                    f"the input of key module {self.name} has shape {tuple(captured.shape)}, not (batch {batch}, "
                    f"time {seq_len}, dim); pass {KEY_MODULE_FLAG} naming a per-token module"
                )
        return captured
