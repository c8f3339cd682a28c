"""The tiny fairseq language model every test builds or trains: one place for its command-line flags.

A ``transformer_lm`` of ``layers`` x ``dim`` (FFN ``2 * dim``, 2 heads), pre-norm unless
``pre_norm=False``; with ``lr`` it also gets the CPU training flags (Adam, one data
worker, seed 1). Seconds per ``fairseq-train`` run on one CPU thread.
"""

from __future__ import annotations


def tiny_lm_argv(
    dim: int = 32,
    *,
    layers: int = 2,
    heads: int = 2,
    tokens_per_sample: int | None = None,
    pre_norm: bool = True,
    io_dims: bool = False,
    dropout: float | None = None,
    lr: str | None = None,
    max_tokens: int | None = None,
) -> list[str]:
    """fairseq flags of the tiny LM (no data, task or criterion).

    ``io_dims`` sets ``--decoder-input-dim`` / ``--decoder-output-dim`` to ``dim`` (fairseq's
    default 512 adds projections around the narrow model); ``lr`` adds the training flags.
    """
    argv = ["--arch", "transformer_lm", "--decoder-layers", str(layers), "--decoder-embed-dim", str(dim),
            "--decoder-ffn-embed-dim", str(2 * dim), "--decoder-attention-heads", str(heads)]
    if pre_norm:
        argv += ["--decoder-normalize-before"]
    if io_dims:
        argv += ["--decoder-input-dim", str(dim), "--decoder-output-dim", str(dim)]
    if dropout is not None:
        argv += ["--dropout", str(dropout)]
    if tokens_per_sample is not None:
        argv += ["--tokens-per-sample", str(tokens_per_sample)]
    if max_tokens is not None:
        argv += ["--max-tokens", str(max_tokens)]
    if lr is not None:
        argv += ["--optimizer", "adam", "--lr", lr, "--cpu", "--num-workers", "0", "--seed", "1"]
    return argv
