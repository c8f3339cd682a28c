"""Hugging Face causal LMs as TRIME models: loading, identities, and the training record.

:func:`load_model_and_tokenizer` loads a ``save_pretrained`` directory, a hub name, or a GGUF
file (``x.gguf``, or a dir with ``gguf_file=NAME``: ``--gguf-file``) with
one-line errors for the usual mistakes (a missing dir or file, a damaged config, tokenizer,
weights or GGUF file, a tokenizer larger than the embeddings), and checks that the model is causal
(:func:`check_causal`: a short probe at load) and offers TRIME keys
(:func:`trime.hooks.hf_key_module`: the input of the last decoder layer's MLP, or the module
named by ``key_module``). A name that is no local dir is looked up on the hub once, without
retries. A GGUF file is dequantized to float by transformers (it needs the ``gguf`` package)
and handed back as an ordinary model (training and ``save_pretrained`` work on it).
:func:`model_identity` is what datastores, plans and results record of a model: the sha256 of
a GGUF file, or one hash over a model dir's config and weights. ``trime-hf-train`` writes
:data:`RECORD` into its output dir (and
:data:`CHECKPOINT_RECORD` into checkpoints); evaluation takes the training block size and key
module from it (:func:`training_record`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from trime.errors import fail
from trime.hooks import KeyCapture, hf_key_module
from trime.io_utils import file_identity, identity_key, read_json, sha256_file

# the training record that trime-hf-train writes beside the model (arguments, data identities, block size)
RECORD = "trime_hf_train.json"
# a trime-hf-train checkpoint's settings (block_size, key_module under "settings"), read when RECORD is absent
CHECKPOINT_RECORD = "trime_hf_checkpoint.json"
# seconds the one hub lookup of a name that is not a local dir may take
HUB_TIMEOUT_S = 10
# tokens of the causality probe run at load (half of them are changed)
CAUSAL_PROBE_TOKENS = 8
# files of which a saved tokenizer has at least one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "merges.txt")
# the suffix of a GGUF file (llama.cpp's format; transformers dequantizes it to float)
GGUF_SUFFIX = ".gguf"
# files that make up a model dir's identity (weights and config)
WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


# ----------------------------------------------------------------------------- loading


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Union[None, str, torch.dtype]:
    """torch dtype from a name (``float32``/``bf16``/``fp16``/...); ``auto``/None pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        fail(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` loads: ``location`` (a dir or hub name) and, for a GGUF model, ``gguf_file``."""

    location: str
    gguf_file: Optional[str] = None  # a local file's path, or the file's name in a hub repo
    local_gguf: bool = False  # gguf_file is a file here

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    def from_pretrained_kwargs(self) -> dict:
        """``gguf_file=`` for ``from_pretrained``: a local file by its absolute path (never looked up elsewhere)."""
        if self.gguf_file is None:
            return {}
        return {"gguf_file": os.path.abspath(self.gguf_file) if self.local_gguf else self.gguf_file}

    def __str__(self) -> str:
        if self.local_gguf:
            return str(self.gguf_file)
        return f"{self.location} (GGUF file {self.gguf_file})" if self.gguf_file else self.location


def is_gguf(name_or_path: Union[str, os.PathLike], gguf_file: Optional[str] = None) -> bool:
    """Whether ``name_or_path`` (with ``gguf_file``) names a GGUF model: a ``.gguf`` path, or any ``gguf_file``."""
    path = str(name_or_path)
    return gguf_file is not None or (path.lower().endswith(GGUF_SUFFIX) and not os.path.isdir(path))


def model_source(
    name_or_path: Union[str, os.PathLike], gguf_file: Optional[str] = None, option: str = "--model"
) -> ModelSource:
    """Where to load ``name_or_path`` from; one line unless it is a usable model dir, hub model or GGUF file.

    ``x.gguf`` is a GGUF file (split into its folder and name); ``gguf_file`` (``--gguf-file``)
    names one inside the dir (or hub repo) ``name_or_path``. A missing ``gguf`` package fails here;
    a damaged GGUF file when its config is read (:func:`_gguf_config`).
    """
    path = str(name_or_path)
    if gguf_file is not None:
        gguf_file = str(gguf_file)
        if os.path.isdir(path):
            file = os.path.join(path, gguf_file)
            if not os.path.isfile(file):
                fail(f"--gguf-file {gguf_file}: no such file in {option} {path}; name a .gguf file inside it")
            _gguf_package(f"--gguf-file {file}")
            return ModelSource(path, file, local_gguf=True)
        if os.path.exists(path):
            fail(
                f"--gguf-file {gguf_file} names a file inside {option} DIR, but {option} {path} is a file; "
                f"drop --gguf-file and pass the .gguf file as {option}"
            )
        _gguf_package(f"{option} {path} --gguf-file {gguf_file}")
        return ModelSource(_hub_model(_hub_name(path, option), option, gguf_file), gguf_file)
    if is_gguf(path):
        if not os.path.isfile(path):
            fail(f"{option} {path}: no such file; pass an existing .gguf file, or a model dir")
        _gguf_package(f"{option} {path}")
        return ModelSource(os.path.dirname(os.path.abspath(path)), path, local_gguf=True)
    if os.path.isdir(path):
        _check_config_json(path, option)
        return ModelSource(path)
    if os.path.exists(path):
        fail(f"{option} {path} is a file; pass a Hugging Face model dir (with config.json), a .gguf file or a hub name")
    return ModelSource(_hub_model(_hub_name(path, option), option))


def check_model_dir(
    name_or_path: Union[str, os.PathLike], option: str = "--model", gguf_file: Optional[str] = None
) -> str:
    """The dir (or hub name) to load ``name_or_path`` from; one line unless it is a usable model dir, hub model
    or GGUF file (:func:`model_source`; for a GGUF file, the folder holding it).

    A name that is not a local dir is a path when it starts with ``.``, ``/`` or ``~``, has more than
    one ``/``, or its parent dir exists here: then it fails at once. Otherwise it is a hub name,
    looked up once (:func:`_hub_model`).
    """
    return model_source(name_or_path, gguf_file, option).location


def _hub_name(path: str, option: str) -> str:
    """``path`` when it may be a hub name; a path that does not exist fails at once."""
    parent = os.path.dirname(path)
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or (parent and os.path.isdir(parent)):
        fail(f"{option} {path}: no such directory; pass a save_pretrained dir or a hub name")
    return path


def _gguf_package(what: str) -> Any:
    """The ``gguf`` module, or one line saying how to install it (transformers needs it to read GGUF files)."""
    try:
        import gguf
    except ImportError:
        fail(f"{what} is a GGUF model; reading it needs the gguf package: pip install gguf")
    return gguf


def _gguf_config(source: ModelSource, option: str) -> Any:
    """The config of a GGUF model (a copy; read once per file version); one line for a file transformers cannot load."""
    version = None
    if source.local_gguf:
        stat = os.stat(source.gguf_file)
        version = (stat.st_size, stat.st_mtime_ns)
    return copy.deepcopy(_read_gguf_config(source, option, version))


@functools.lru_cache(maxsize=None)
def _read_gguf_config(source: ModelSource, option: str, version: Optional[Tuple[int, int]]) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **source.from_pretrained_kwargs())
    except Exception as err:  # a truncated or foreign file raises anything from numpy and struct parsing
        _gguf_fault(source, err, option)


def _gguf_fault(source: ModelSource, err: BaseException, option: str) -> NoReturn:
    """One line for a GGUF model that does not load: a damaged file (its header or tensors do not read), or an
    architecture transformers cannot dequantize."""
    what = f"{option} {source}"
    if source.local_gguf:
        gguf = _gguf_package(what)
        try:
            reader = gguf.GGUFReader(source.gguf_file)  # maps the file and checks every tensor lies inside it
            field = reader.fields["general.architecture"]
            architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
        except KeyError:
            fail(f"{what} is damaged or incomplete (no general.architecture entry); download or convert it again")
        except Exception as damage:
            fail(f"{what} is damaged or incomplete ({_first_line(damage)}); download or convert it again")
        what += f" (architecture {architecture!r})"
    fail(
        f"{what}: transformers cannot load this GGUF model ({type(err).__name__}: {_first_line(err)}); use an "
        "architecture it dequantizes (Llama, Mistral, Qwen2, GPT-2, ...) or a Hugging Face model dir"
    )


def _check_config_json(path: str, option: str) -> None:
    """A local model dir's config.json must exist and be a JSON object (transformers' own errors blame other files)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        ggufs = sorted(f.name for f in Path(path).glob(f"*{GGUF_SUFFIX}"))
        if ggufs:
            fail(f"{option} {path} has no config.json but holds {ggufs[0]}; pass --gguf-file {ggufs[0]} "
                 f"(or {option} {os.path.join(path, ggufs[0])})")
        fail(f"{option} {path} has no config.json; it is not a Hugging Face model dir (save one with save_pretrained)")
    try:
        with open(config, encoding="utf-8") as f:
            body = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{option} {config} is not valid JSON ({_first_line(err)}); save the model again with save_pretrained")
    if not isinstance(body, dict):
        fail(f"{option} {config} is not a JSON object; save the model again with save_pretrained")


@functools.lru_cache(maxsize=None)
def _hub_model(name: str, option: str, filename: str = "config.json") -> str:
    """``name`` when the hub has it (or, offline, its cache does); else one line saying no local dir exists.

    One lookup, no retries. With ``HF_HUB_OFFLINE`` set only the cache is asked (for ``filename``). When
    the hub cannot be reached but a copy is cached, the cached snapshot dir is returned, so loading does
    not retry the hub.
    """
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(name, filename)
    except ValueError:  # not a valid repo id either
        fail(f"{option} {name}: no such directory; pass a save_pretrained dir or a hub name")
    cached = cached if isinstance(cached, str) else None
    if constants.HF_HUB_OFFLINE:
        if cached:
            return name
        fail(
            f"{option} {name}: no such local directory, and HF_HUB_OFFLINE is set and the hub cache has no "
            f"{name}; pass a save_pretrained dir"
        )
    try:
        model_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return name  # it exists; transformers asks for the token
    except RepositoryNotFoundError:
        fail(
            f"{option} {name}: no such local directory, and the hub has no model {name} (a private one needs "
            "`hf auth login`); pass a save_pretrained dir or a hub name"
        )
    except Exception as err:  # the network: unreachable, timed out, refused
        if cached:
            return os.path.dirname(cached)
        fail(
            f"{option} {name}: no such local directory, and the hub lookup failed ({_first_line(err)}); "
            "pass a save_pretrained dir, or connect and retry"
        )
    return name


def load_tokenizer(name_or_path: Union[str, os.PathLike], option: str = "--model", gguf_file: Optional[str] = None):
    """The tokenizer saved with the model (a GGUF file's own); one-line error when the dir has none."""
    from transformers import AutoTokenizer

    source = model_source(name_or_path, gguf_file, option)
    if source.is_gguf:
        _gguf_config(source, option)  # a damaged file or an architecture transformers cannot load, named first
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location, **source.from_pretrained_kwargs())
        except Exception as err:  # an unknown tokenizer type, missing metadata, a hub failure
            fail(f"{option} {source}: cannot build a tokenizer from the GGUF file ({type(err).__name__}: "
                 f"{_first_line(err)}); use a model dir with a saved tokenizer")
        return tokenizer
    path = source.location
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        fail(
            f"{option} {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); save it beside the "
            f"model with tokenizer.save_pretrained({path!r})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # damaged files raise anything: JSON, Rust (plain Exception), sentencepiece errors
        if os.path.isdir(path):
            fail(
                f"{option} {path} has no usable tokenizer ({type(err).__name__}: {_first_line(err)}); save it beside "
                f"the model with tokenizer.save_pretrained({path!r})"
            )
        fail(f"{option} {path}: cannot load its tokenizer ({_first_line(err)}); offline? pass a local model dir")
    if tokenizer is None or isinstance(tokenizer, bool):
        fail(f"{option} {path} has no tokenizer; save it beside the model with tokenizer.save_pretrained({path!r})")
    return tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def load_model(
    name_or_path: Union[str, os.PathLike],
    dtype: Union[None, str, torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    key_module: Optional[str] = None,
    option: str = "--model",
    key_origin: str = "key_module",
    gguf_file: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """``AutoModelForCausalLM`` from a local dir, hub name or GGUF file, checked to be causal and to offer TRIME keys.

    ``dtype``: None (transformers' default: in v5 the dtype saved in config.json, as
    ``auto``; float32 for a GGUF file) or a name/torch dtype (``float32`` for training with mixed
    precision). ``gguf_file`` names a GGUF file inside the dir or hub repo ``name_or_path``; a
    ``.gguf`` path needs none. ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``).
    ``key_origin`` names where ``key_module`` came from in messages (a flag or the training record).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_source(name_or_path, gguf_file, option)
    path = str(source)
    if source.is_gguf:
        config = _gguf_config(source, option)
    else:
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            fail(f"{option} {path}: cannot read its config ({_first_line(err)})")
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        fail(
            f"{option} {path} is a {config.model_type!r} model, not a causal LM that AutoModelForCausalLM loads; "
            "use a decoder-only model (GPT-2, Llama, GPT-NeoX, OPT, ...)"
        )
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if source.is_gguf:
        model = _load_gguf_model(source, option, kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (OSError, ValueError, RuntimeError, EOFError, KeyError, SafetensorError, pickle.UnpicklingError) as err:
            _weights_fault(path, err, option)
    if device is not None:
        model = model.to(device)
    check_causal(model, option=f"{option} {path}")  # non-causal models (BERT as an LM) fail before any work
    hf_key_module(model, key_module, origin=key_origin)  # so do architectures without TRIME keys
    check_causal(model, key_module, option=f"{option} {path}", keys=True)
    return model


def _load_gguf_model(source: ModelSource, option: str, kwargs: dict) -> nn.Module:
    """The GGUF model dequantized to float, as an ordinary model over the same tensors.

    transformers marks a GGUF-loaded model as quantized even once its weights are plain floats, so
    ``save_pretrained`` and ``Trainer`` refuse it; a model built from its config (without the
    quantization entry) takes over the loaded tensors without a copy.
    """
    from transformers import AutoModelForCausalLM

    try:
        from transformers import GgufConfig  # where transformers can keep GGUF blocks packed: unpack them
    except ImportError:
        GgufConfig = None
    if GgufConfig is not None:
        kwargs.setdefault("quantization_config", GgufConfig(dequantize=True))
    kwargs.setdefault("config", _gguf_config(source, option))  # parsing the file's metadata again is slow
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source.location, **source.from_pretrained_kwargs(), **kwargs)
    except Exception as err:  # damaged tensors or an unsupported quantization raise anything
        _gguf_fault(source, err, option)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(loaded.parameters()).dtype
    model = type(loaded).from_pretrained(
        None, config=config, state_dict=loaded.state_dict(), dtype=dtype,
        attn_implementation=loaded.config._attn_implementation,
    )  # fmt: skip
    model.config.name_or_path = str(source)
    return model


def _weights_fault(path: str, err: BaseException, option: str) -> NoReturn:
    """One line for weights that do not load: missing, damaged (naming the file), or not matching config.json."""
    message = _first_line(err)
    if "mismatched_sizes" in str(err) or "size mismatch" in str(err):
        fail(
            f"{option} {path}: its weights do not match its config.json (tensor shapes differ); save the config "
            "and the weights together with save_pretrained"
        )
    damaged = _damaged_weight_file(path) if os.path.isdir(path) else None
    if damaged is not None:
        fail(f"{option} {damaged} is damaged or incomplete ({message}); save or download the model again")
    fail(f"{option} {path}: cannot load the model weights ({message})")


def _damaged_weight_file(path: str) -> Optional[Path]:
    """The first weight file of a local dir whose header does not read (safetensors) or that is no zip (torch)."""
    for weights in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return weights
    for weights in sorted(Path(path).glob("*.bin")):
        if not zipfile.is_zipfile(weights):
            return weights
    return None


def _probe_ids(model: nn.Module) -> Optional[torch.Tensor]:
    """(2, n) token ids equal in their first n/2 positions and different after; None if the model is too small."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    positions = getattr(model.config, "max_position_embeddings", None) or CAUSAL_PROBE_TOKENS
    n = min(CAUSAL_PROBE_TOKENS, int(positions))
    if vocab < 2 or n < 2:
        return None
    ids = (torch.arange(n) * 7919 + 3) % vocab
    other = ids.clone()
    other[n // 2:] = (ids[n // 2:] + 1 + vocab // 2) % vocab
    return torch.stack([ids, other]).to(next(model.parameters()).device)


@torch.no_grad()
def check_causal(model: nn.Module, key_module: Optional[str] = None, option: str = "--model",
                 keys: bool = False) -> None:
    """Fail with one line unless the model is causal: its logits (``keys``: its TRIME keys) at a position
    stay the same when a later token changes. A short probe of two :data:`CAUSAL_PROBE_TOKENS`-token rows.

    TRIME's memories hold the keys of earlier positions; a model whose attention sees later
    tokens (BERT loaded as an LM) would be scored and trained on the tokens it predicts.
    """
    ids = _probe_ids(model)
    if ids is None:
        return
    training = model.training
    model.eval()
    try:
        with _float32_weights(model) as dtype:
            out, what = _probe_outputs(model, ids, key_module, keys)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        fail(f"{option}: a {ids.shape[1]}-token probe forward pass fails ({type(err).__name__}: {_first_line(err)})")
    finally:
        model.train(training)
    out = out.float()
    if not torch.isfinite(out).all():
        cause = "its weights are damaged" if dtype == torch.float32 else f"{dtype} overflows (load it in float32)"
        fail(f"{option} gives non-finite {what} (NaN/inf) on a {ids.shape[1]}-token probe in {dtype}: {cause}")
    # a causal model repeats its earlier outputs exactly (each row's arithmetic is the same); the margin of two
    # units in the last place of the largest output only spares a kernel that rounds rows differently
    half = ids.shape[1] // 2
    change = float((out[0, :half] - out[1, :half]).abs().max())
    tolerance = 2 * torch.finfo(dtype).eps * float(out.abs().max())
    if change > tolerance:
        fail(
            f"{option} ({type(model).__name__}) is not causal: its {what} at a position change when a later token "
            "changes, so it would see the tokens it predicts; use a causal (decoder-only) LM such as GPT-2 or Llama"
        )


def _probe_outputs(model: nn.Module, ids: torch.Tensor, key_module: Optional[str],
                   keys: bool) -> Tuple[torch.Tensor, str]:
    """(outputs, what they are) of the causality probe: the TRIME keys or the logits of ``ids``."""
    if keys:
        with KeyCapture.hf(model, key_module, stop=True) as capture:
            model.base_model(input_ids=ids, use_cache=False)
        return capture.keys(tuple(ids.shape)), "TRIME keys"
    return model(input_ids=ids, use_cache=False).logits, "logits"


@contextlib.contextmanager
def _float32_weights(model: nn.Module) -> Iterator[torch.dtype]:
    """Run the block with the model's bf16/fp16 parameters and buffers as float32 copies, and yield the dtype
    the probe computes in; the original tensors are put back untouched afterwards.

    A look-ahead effect smaller than half-precision rounding (a barely trained bidirectional model) is
    still far above float32 rounding. When the copies do not fit in memory the probe runs in the load dtype.
    """
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.element_size() < 4]
    if not tensors:
        yield next(model.parameters()).dtype
        return
    originals = [t.data for t in tensors]
    try:
        for tensor in tensors:
            tensor.data = tensor.data.float()
    except torch.OutOfMemoryError:
        for tensor, original in zip(tensors, originals):
            tensor.data = original
        yield originals[0].dtype
        return
    try:
        yield torch.float32
    finally:
        for tensor, original in zip(tensors, originals):
            tensor.data = original


def load_model_and_tokenizer(
    name_or_path: Union[str, os.PathLike],
    dtype: Union[None, str, torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    key_module: Optional[str] = None,
    option: str = "--model",
    key_origin: str = "key_module",
    gguf_file: Optional[str] = None,
    **kwargs: Any,
) -> Tuple[nn.Module, Any]:
    """(model, tokenizer) of a ``save_pretrained`` dir, hub name or GGUF file (``x.gguf``, or a dir or hub repo
    with ``gguf_file``); the tokenizer is checked first, and fits."""
    tokenizer = load_tokenizer(name_or_path, option, gguf_file=gguf_file)
    model = load_model(name_or_path, dtype=dtype, device=device, key_module=key_module, option=option,
                       key_origin=key_origin, gguf_file=gguf_file, **kwargs)
    check_tokenizer_fits(model, tokenizer, f"{option} {model_source(name_or_path, gguf_file, option)}")
    return model, tokenizer


def check_tokenizer_fits(model: nn.Module, tokenizer: Any, option: str = "--model") -> None:
    """Fail with one line when the tokenizer can give ids beyond the model's input or output embeddings."""
    size = len(tokenizer)
    for side, embeddings in (("input", model.get_input_embeddings()), ("output", model.get_output_embeddings())):
        weight = getattr(embeddings, "weight", None)
        if weight is None:
            continue
        rows = int(weight.shape[0])
        if size > rows:
            fail(
                f"the tokenizer of {option} has {size} tokens but the model has {rows} {side} embeddings; "
                "save the tokenizer the model was made with beside it (or resize the embeddings)"
            )


def is_hf_model_dir(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a Hugging Face model dir (a directory with ``config.json``)."""
    return (Path(path) / "config.json").is_file()


def model_identity(name_or_path: Union[str, os.PathLike], gguf_file: Optional[str] = None) -> dict:
    """What datastores, plans and results record of a model; :func:`trime.io_utils.identity_key` compares two.

    A GGUF file (``x.gguf``, or ``gguf_file`` inside the dir): its size and sha256. A model dir: one
    hash over its config and weight files (names and contents). A hub name: that of nothing local.
    """
    path = str(name_or_path)
    file = os.path.join(path, str(gguf_file)) if gguf_file is not None else path if is_gguf(path) else None
    if file is not None and os.path.isfile(file):
        return {"path": file, "bytes": os.path.getsize(file), "sha256": sha256_file(file), "format": "gguf"}
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in Path(path).glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    total = 0
    for f in files:
        identity = file_identity(f)
        total += identity["bytes"]
        digest.update(f"{f.name}\0{identity_key(identity)}\n".encode())
    return {"path": path, "bytes": total, "files": len(files), "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------- the training record


@dataclass
class TrainingRecord:
    """What trime-hf-train recorded about a model dir: the block size and the key module it trained with."""

    file: Path
    block_size: Optional[int]
    key_module: Optional[str]  # None: the default (the last decoder layer's MLP)
    knows_key_module: bool  # False for records written before key_module was recorded


def training_record(model_dir: Union[str, os.PathLike]) -> Optional[TrainingRecord]:
    """The checked training record of ``model_dir`` (:data:`RECORD`, else a checkpoint's
    :data:`CHECKPOINT_RECORD`), or None when it has neither; a damaged one fails with one line."""
    model_dir = Path(model_dir)
    file = next((model_dir / name for name in (RECORD, CHECKPOINT_RECORD) if (model_dir / name).is_file()), None)
    if file is None:
        return None
    body = read_json(file, what="training record")
    settings = body.get("settings", {}) if isinstance(body, dict) else None
    if not isinstance(settings, dict):
        fail(f"training record {file} is damaged (not a JSON object); delete it or train again")
    fields = {**settings, **body}  # the final record's top-level fields, else a checkpoint's settings
    block_size = fields.get("block_size")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        fail(f"training record {file} has block_size {block_size!r}, not a positive integer; fix it or delete it")
    key_module = fields.get("key_module")
    if key_module is not None and (not isinstance(key_module, str) or not key_module):
        fail(f"training record {file} has key_module {key_module!r}, not a module name; fix it or delete it")
    return TrainingRecord(file, block_size, key_module, "key_module" in fields)
