"""Criterion ``trime_loss`` on real tiny fairseq models, against an independent dense reference.

The reference takes its keys from a forward hook on the last layer's
``final_layer_norm`` (the criterion hooks ``fc1``'s input instead), so the test also
checks that the keys are the post-LayerNorm input of the last FFN.
"""

import math

import pytest
import torch
from fairseq import options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from tests.dense_reference import dense_nll, dense_visibility
from tests.tiny_lm import tiny_lm_argv
from trime.errors import TrimeError

VOCAB_WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lmdict")
    d = Dictionary()
    for i, w in enumerate(VOCAB_WORDS):
        d.add_symbol(w, n=1000 - i)
    d.save(str(path / "dict.txt"))
    return path


def build(dict_dir, extra=(), criterion="trime_loss"):
    argv = [
        str(dict_dir), "--task", "language_modeling", *tiny_lm_argv(16, pre_norm=False, dropout=0, tokens_per_sample=8),
        "--criterion", criterion, *extra,
    ]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion


def make_sample(task, batch=3, seq_len=8, pad_last=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    tokens = torch.randint(d.nspecial, d.nspecial + 12, (batch, seq_len + 1), generator=g)  # few types: positives
    src, tgt = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    if pad_last:
        src[-1, -pad_last:] = d.pad()
        tgt[-1, -pad_last:] = d.pad()
    return {
        "net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)},
        "target": tgt,
        "ntokens": int(tgt.ne(d.pad()).sum()),
    }


def reference_loss(model, sample, pad):
    """Dense TRIME loss with keys from a LayerNorm forward hook.

    The FFN input is the output of ``final_layer_norm`` in a pre-norm layer and of
    ``self_attn_layer_norm`` in a post-norm one (fairseq's plain ``transformer_lm``).
    """
    store = {}
    layer = model.decoder.layers[-1]
    norm = layer.final_layer_norm if layer.normalize_before else layer.self_attn_layer_norm
    handle = norm.register_forward_hook(
        lambda m, i, o: store.__setitem__("reps", o)
    )
    net_output = model(**sample["net_input"])
    handle.remove()
    reps = store["reps"].transpose(0, 1)
    batch, seq_len, dim = reps.shape
    targets = sample["target"].reshape(-1)
    valid = targets.ne(pad).tolist()
    asm = model.decoder.adaptive_softmax
    if asm is None:
        logits = net_output[0].reshape(batch * seq_len, -1)
        logprob = torch.log_softmax(logits.double(), -1)
        logz = torch.logsumexp(logits.double(), -1)
    else:
        feats = net_output[0].reshape(batch * seq_len, -1)
        head = asm.head(feats).double()
        head_logprob = torch.log_softmax(head, -1)
        parts = [head_logprob[:, : asm.cutoff[0]]]  # explicit full-vocabulary log-probs
        for c, tail in enumerate(asm.tail):
            parts.append(head_logprob[:, asm.cutoff[0] + c, None] + torch.log_softmax(tail(feats).double(), -1))
        logprob = torch.cat(parts, 1)
        logz = torch.logsumexp(head, -1)
    score = logprob.gather(1, targets[:, None]).squeeze(1) + logz
    flat = list(range(batch * seq_len))
    seg = [i // seq_len for i in flat]
    vis = dense_visibility("local", seg, flat, seg, flat, valid, valid)
    flat_reps = reps.reshape(batch * seq_len, dim)
    nll = dense_nll(flat_reps, flat_reps, targets, targets, score, logz, vis, 1 / math.sqrt(dim), valid)
    return nll.sum(), (logz - score)[torch.tensor(valid)].sum()


@pytest.mark.parametrize("adaptive,pre_norm", [(False, True), (True, True), (False, False)])
def test_criterion_equals_dense_reference_on_hooked_keys(dict_dir, adaptive, pre_norm):
    extra = ["--adaptive-softmax-cutoff", "10,25", "--adaptive-softmax-dropout", "0"] if adaptive else []
    extra += ["--decoder-normalize-before"] if pre_norm else []
    task, model, criterion = build(dict_dir, extra)
    assert model.decoder.layers[-1].normalize_before == pre_norm
    model.eval()  # no dropout; the criterion still computes the TRIME loss (not in CE warm-up)
    sample = make_sample(task)
    loss, sample_size, log = criterion(model, sample)
    assert sample_size == sample["ntokens"] == log["ntokens"]
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    ref, ref_ce = reference_loss(model, sample, task.source_dictionary.pad())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log["ori_loss"].double(), ref_ce, rtol=1e-5, atol=1e-5)
    assert log["norm_loss"] == log["loss"]
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
        if rg is None or g is None:  # unused parameter (e.g. a tail cluster no target falls in)
            assert all(x is None or x.abs().max() == 0 for x in (g, rg)), name
            continue
        torch.testing.assert_close(g.double(), rg.double(), rtol=1e-4, atol=1e-6, msg=name)


def test_memory_changes_the_loss_and_keys_get_gradient(dict_dir):
    task, model, criterion = build(dict_dir, ["--decoder-normalize-before"])
    model.eval()
    sample = make_sample(task, pad_last=0)
    loss, _, log = criterion(model, sample)
    assert not torch.isclose(log["norm_loss"], log["ori_loss"])
    # the last FFN's own weights do not influence the keys (taken before fc1), but
    # the layer norm right before does, through both queries and keys
    ln = model.decoder.layers[-1].final_layer_norm.weight
    (g,) = torch.autograd.grad(loss, ln)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("criterion_name", ["trime_loss", "trime_long_loss_same_device"])
def test_one_pass_loss_equals_two_pass_memory_terms(dict_dir, monkeypatch, criterion_name):
    """The criterion's loss takes trime.loss's one-pass memory_joint_nll; a subclass that overrides
    memory_terms keeps the two-pass loss: same logging values and gradients within fp32 round-off."""
    import trime.loss as loss_module

    extra = ["--allow-random-batches"] if criterion_name != "trime_loss" else []
    task, model, criterion = build(dict_dir, ["--decoder-normalize-before", *extra], criterion=criterion_name)
    model.eval()
    sample = make_sample(task)
    calls = []
    one_pass = loss_module._one_pass
    monkeypatch.setattr(loss_module, "_one_pass", lambda *a: calls.append(1) or one_pass(*a))
    params = list(model.parameters())
    loss, _, log = criterion(model, sample)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert calls == [1]

    class TwoPass(type(criterion)):
        def memory_terms(self, reps, targets, valid, model, sample):
            return super().memory_terms(reps, targets, valid, model, sample)

    criterion.__class__ = TwoPass
    loss2, _, log2 = criterion(model, sample)
    grads2 = torch.autograd.grad(loss2, params, allow_unused=True)
    assert calls == [1] and set(log) == set(log2)
    for key in log:
        torch.testing.assert_close(torch.as_tensor(log[key]), torch.as_tensor(log2[key]), rtol=1e-6, atol=1e-6)
    for g, g2 in zip(grads, grads2):
        assert (g is None) == (g2 is None)
        if g is not None:
            torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-6)


def test_ce_warmup_switches_by_epoch_and_validation_reports_trime(dict_dir):
    task, model, criterion = build(dict_dir, ["--ce-warmup-epoch", "2"])
    sample = make_sample(task)
    model.train()
    for epoch, warm in [(1, True), (2, True), (3, False)]:
        task.begin_epoch(epoch, model)
        loss, _, log = criterion(model, sample)
        if warm:
            assert "norm_loss" not in log and torch.equal(loss.data, log["ori_loss"])
        else:
            assert torch.equal(loss.data, log["norm_loss"])
    task.begin_epoch(1, model)
    model.eval()
    loss, _, log = criterion(model, sample)
    assert "norm_loss" in log and torch.equal(loss.data, log["norm_loss"])


def test_reduce_metrics_in_bits_per_token(dict_dir):
    from fairseq import metrics

    _, _, criterion = build(dict_dir)
    logs = [{"loss": torch.tensor(10.0), "ori_loss": torch.tensor(12.0), "norm_loss": torch.tensor(10.0), "sample_size": 5}] * 2
    with metrics.aggregate() as agg:
        criterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(20 / 10 / math.log(2), abs=1e-3)
    assert values["ori_loss"] == pytest.approx(24 / 10 / math.log(2), abs=1e-3)
    assert values["ppl"] == pytest.approx(2 ** values["loss"], rel=1e-2)


def test_non_lm_task_is_refused(tmp_path):
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    d = Dictionary()
    task = TranslationTask(TranslationConfig(data=str(tmp_path)), d, d)
    from trime.criterions.trime_loss import TrimeLoss

    with pytest.raises(TrimeError, match="language-modelling task"):
        TrimeLoss(task)


def test_model_without_hookable_ffn_is_refused(dict_dir):
    task, model, criterion = build(dict_dir)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(dict_dir), "--task", "language_modeling", "--arch", "lstm_lm", "--decoder-layers", "1",
                 "--decoder-embed-dim", "8", "--decoder-hidden-size", "8", "--decoder-out-embed-dim", "8"]
    )
    lstm = task.build_model(convert_namespace_to_omegaconf(args).model)
    with pytest.raises(TrimeError, match="decoder.layers"):
        criterion(lstm, make_sample(task))
