"""Shared helpers of the Hugging Face tests: a tokenizer trained here, tiny random models, a dense reference.

Nothing is downloaded. :func:`tokenizer_dir` trains a small byte-level BPE tokenizer
with the ``tokenizers`` library (``trime.hf.text.train_bpe_tokenizer``) on the shipped
WikiText-2 sample and saves it with ``save_pretrained``; :func:`build_model` makes tiny random-initialised GPT-2, Llama,
GPT-NeoX and OPT models from configs; :func:`model_dir` saves one with its tokenizer.
Results are cached per process (``functools.lru_cache``), so test modules share them.

:func:`dense_trime_nll` is an independent float64 reference of the TRIME loss over a
(B, T) batch: an explicit N x N score matrix and masks written from the HF front-end's visibility
rules, with keys taken from a forward hook on the *norm module's output*
(:data:`NORM_MODULES`), not from the MLP pre-hook that ``trime.hf`` uses.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TRAIN = REPO_ROOT / "samples" / "wikitext-2" / "wiki.train.tokens"
SAMPLE_VALID = REPO_ROOT / "samples" / "wikitext-2" / "wiki.valid.tokens"
SAMPLE_TEST = REPO_ROOT / "samples" / "wikitext-2" / "wiki.test.tokens"
VOCAB_SIZE = 512
ARCHS = ("gpt2", "llama", "gpt_neox", "opt")
# the module whose *output* is the key (the norm in front of the last layer's feed-forward block)
NORM_MODULES = {
    "gpt2": "transformer.h.1.ln_2",
    "llama": "model.layers.1.post_attention_layernorm",
    "gpt_neox": "gpt_neox.layers.1.post_attention_layernorm",
    "opt": "model.decoder.layers.1.final_layer_norm",
}
_WORK = Path(tempfile.mkdtemp(prefix="trime-hf-tests-"))


@functools.lru_cache(maxsize=None)
def tokenizer_dir(vocab_size: int = VOCAB_SIZE) -> Path:
    """A byte-level BPE tokenizer trained on the shipped WikiText-2 train sample, saved with save_pretrained."""
    from trime.hf.text import train_bpe_tokenizer

    out = _WORK / f"tokenizer-{vocab_size}"
    train_bpe_tokenizer([SAMPLE_TRAIN], vocab_size, out)
    return out


def load_test_tokenizer(vocab_size: int = VOCAB_SIZE):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(vocab_size))


def tiny_config(arch: str, vocab_size: int = VOCAB_SIZE, max_positions: int = 128, **overrides):
    """A 2-layer, 32-d config of ``arch`` without dropout."""
    import transformers as tf

    ids = {"bos_token_id": 0, "eos_token_id": 0}  # the test tokenizer's <|endoftext|>
    if arch == "gpt2":
        cfg = tf.GPT2Config(**ids, vocab_size=vocab_size, n_positions=max_positions, n_embd=32, n_layer=2, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif arch == "llama":
        cfg = tf.LlamaConfig(**ids, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**ids, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=max_positions, rotary_pct=0.5,
                               use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0)
    elif arch == "opt":
        cfg = tf.OPTConfig(**ids, vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=max_positions, word_embed_proj_dim=32,
                           dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random-initialised causal LM of ``arch`` (eval mode off: ``model.train()`` is the caller's)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="eager")
    return model.to(dtype)


@functools.lru_cache(maxsize=None)
def model_dir(arch: str = "gpt2", seed: int = 0) -> Path:
    """A save_pretrained dir of a tiny ``arch`` model with the test tokenizer beside it. Read-only."""
    out = _WORK / f"model-{arch}-{seed}"
    build_model(arch, seed).save_pretrained(out)
    load_test_tokenizer().save_pretrained(out)
    return out


def text_head(src: Path, dest: Path, chars: int) -> Path:
    """``dest``: the first ``chars`` characters of ``src``, cut back to a whole line."""
    text = src.read_text(encoding="utf-8")[:chars]
    dest.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return dest


def hf_train_argv(model: Path, train_file: Path, out: Path, memory: str, *extra: str, block: int = 32, batch: int = 4,
                  steps: int = 3, lr: str = "1e-3") -> list[str]:
    """``trime-hf-train`` flags of a few CPU steps on a tiny model, logging every step (``extra`` appended)."""
    return ["--model", str(model), "--train-file", str(train_file), "--block-size", str(block), "--output-dir", str(out),
            "--memory", memory, "--max-steps", str(steps), "--per-device-train-batch-size", str(batch),
            "--learning-rate", lr, "--logging-steps", "1", "--no-progress-bar", "--cpu", *extra]


def sample_batch(batch: int = 3, seq_len: int = 12, seed: int = 0, few_types: int = 12) -> torch.Tensor:
    """(batch, seq_len) ids drawn from ``few_types`` token types, so that many memory keys are positives."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 5 + few_types, (batch, seq_len), generator=g)


def right_padding(batch: int, seq_len: int, pads: dict) -> torch.Tensor:
    """attention_mask (batch, seq_len) with ``pads[row]`` trailing zeros."""
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row, count in pads.items():
        mask[row, seq_len - count:] = 0
    return mask


class NormOutputHook:
    """Records the output of the norm module in front of the last feed-forward block (the reference's keys)."""

    def __init__(self, model, arch: str) -> None:
        self.module = model.get_submodule(NORM_MODULES[arch])
        self.output = None

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda mod, args, out: setattr(self, "output", out))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def dense_trime_nll(
    model,
    arch: str,
    input_ids: torch.Tensor,
    memory: str,
    attention_mask: Optional[torch.Tensor] = None,
    external_local: bool = True,
    temperature: float = 1.0,
    key_rows_detached: Optional[torch.Tensor] = None,
    query_rows: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of TRIME NLL, number of predicted tokens) by explicit N x N matrices.

    Position t of row b predicts token t+1; it is a query (and a key) iff it and its next
    token are real (attention_mask 1). Visibility: local = earlier positions of the row;
    long = every earlier position in row-major order; external = every position of the
    other rows plus (``external_local``) earlier positions of the own row.
    ``key_rows_detached`` marks rows whose keys are constants and ``query_rows`` the rows
    whose queries count (the per-rank view of a distributed run).
    """
    batch, seq_len = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    with NormOutputHook(model, arch) as hook:
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    reps = hook.output.reshape(batch, seq_len, -1)
    logits = logits.double()
    reps = reps.double()
    if key_rows_detached is not None:
        reps_keys = torch.where(key_rows_detached[:, None, None], reps.detach(), reps)
    else:
        reps_keys = reps
    targets = torch.full((batch, seq_len), -1, dtype=torch.long)
    targets[:, :-1] = input_ids[:, 1:]
    valid = torch.zeros(batch, seq_len, dtype=torch.bool)
    valid[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool()
    n = batch * seq_len
    q = reps.reshape(n, -1)
    k = reps_keys.reshape(n, -1)
    y = targets.reshape(n)
    ok = valid.reshape(n)
    row = torch.arange(n) // seq_len
    pos = torch.arange(n) % seq_len
    flat = torch.arange(n)
    scores = (q @ k.T) / (math.sqrt(q.shape[1]) * temperature)
    same_row = row[:, None] == row[None, :]
    earlier_in_row = same_row & (pos[None, :] < pos[:, None])
    if memory == "local":
        vis = earlier_in_row
    elif memory == "long":
        vis = flat[None, :] < flat[:, None]
    elif memory == "external":
        vis = ~same_row | earlier_in_row if external_local else ~same_row
    elif memory == "none":
        vis = torch.zeros(n, n, dtype=torch.bool)
    else:
        raise ValueError(memory)
    vis = vis & ok[None, :] & ok[:, None]
    positive = vis & (y[None, :] == y[:, None])
    flat_logits = logits.reshape(n, -1)
    safe_y = y.clamp(min=0)
    target_logit = flat_logits.gather(1, safe_y[:, None]).squeeze(1)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    numerator = torch.logaddexp(target_logit, torch.logsumexp(torch.where(positive, scores, neg_inf), dim=1))
    denominator = torch.logaddexp(torch.logsumexp(flat_logits, dim=1),
                                  torch.logsumexp(torch.where(vis, scores, neg_inf), dim=1))
    nll = torch.where(ok, denominator - numerator, torch.zeros_like(numerator))
    if query_rows is not None:
        keep = query_rows[row]
        nll = torch.where(keep, nll, torch.zeros_like(nll))
        ok = ok & keep
    return nll.sum(), int(ok.sum())


def param_grads(model, loss: torch.Tensor) -> dict:
    """{name: grad} of ``loss`` w.r.t. the model's parameters (zeroed first)."""
    model.zero_grad()
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(actual: dict, expected: dict, tol: float = 2e-5) -> None:
    """Every gradient within ``tol`` x its largest entry, +1e-7 for ~0 ones (key biases).

    trime.loss accumulates in fp32 whatever the model dtype, so fp32 precision is the bar.
    """
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = float(expected[name].abs().max()) + 1e-12
        torch.testing.assert_close(actual[name].double(), expected[name].double(), rtol=0, atol=tol * scale + 1e-7, msg=name)
