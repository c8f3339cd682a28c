"""The TRIME paper's transformer LM architectures (reference section 4.1).

All are pre-norm with sinusoidal positions, ReLU, scaled embeddings, attention and
activation dropout 0.1. Adaptive input/softmax is *not* part of these archs: as in
the original training scripts it is switched on by flags, e.g. for WikiText-103
``--adaptive-input --tie-adaptive-weights --adaptive-input-cutoff 20000,60000
--adaptive-softmax-cutoff 20000,60000 --adaptive-input-factor 1
--adaptive-softmax-factor 1 --adaptive-softmax-dropout 0`` and for enwik8 the same
with cutoff 208. ``transformer_lm_wiki103`` (247M) is fairseq's stock arch.
"""

from fairseq.models import register_model_architecture
from fairseq.models.transformer_lm import base_lm_architecture


def _set_default(args, name: str, value) -> None:
    if getattr(args, name, None) is None:
        setattr(args, name, value)


def _trime_defaults(args, layers: int, dim: int, ffn: int, heads: int) -> None:
    for name, value in [
        ("decoder_layers", layers),
        ("decoder_embed_dim", dim),
        ("decoder_ffn_embed_dim", ffn),
        ("decoder_attention_heads", heads),
        ("dropout", 0.3),
        ("attention_dropout", 0.1),
        ("activation_dropout", 0.1),
        ("activation_fn", "relu"),
        ("no_decoder_final_norm", False),
    ]:
        _set_default(args, name, value)
    base_lm_architecture(args)


@register_model_architecture("transformer_lm", "transformer_lm_wiki103_150M")
def transformer_lm_wiki103_150m(args) -> None:
    """150M WikiText-103 model ("same as Transformer-XL"): 16 x 410, FFN 2100, 10 heads."""
    _trime_defaults(args, layers=16, dim=410, ffn=2100, heads=10)


@register_model_architecture("transformer_lm", "transformer_lm_enwik8")
def transformer_lm_enwik8(args) -> None:
    """38M enwik8 model: 12 x 512, FFN 2048, 8 heads."""
    _trime_defaults(args, layers=12, dim=512, ffn=2048, heads=8)
