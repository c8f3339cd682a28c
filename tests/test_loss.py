"""trime.loss against an independent dense (N x M mask) brute-force reference."""

import math

import pytest
import torch

from tests.dense_reference import dense_nll, dense_visibility
from trime.heads import adaptive_softmax_terms, full_softmax_terms
from trime.loss import (
    Rule,
    Visibility,
    joint_nll,
    memory_logsumexp,
    memory_logsumexp_at_scales,
    scored_memory_logsumexp,
)


def make_batch(batch, seq_len, dim, vocab, seed, pad_tail=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    reps = torch.randn(batch * seq_len, dim, generator=g).to(dtype)
    targets = torch.randint(0, vocab, (batch * seq_len,), generator=g)
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    if pad_tail:
        valid[-1, -pad_tail:] = False
    logits = torch.randn(batch * seq_len, vocab, generator=g) * 2
    return reps, targets, valid, logits


@pytest.mark.parametrize(
    "rule,external_local", [("local", True), ("long", True), ("external", True), ("external", False)]
)
@pytest.mark.parametrize("pad_tail", [0, 3])
def test_values_and_gradients_match_dense(rule, external_local, pad_tail):
    batch, seq_len, dim, vocab = 3, 7, 8, 5  # small vocab: many positives
    reps, targets, valid, logits = make_batch(batch, seq_len, dim, vocab, seed=1, pad_tail=pad_tail)
    logits.requires_grad_(True)
    reps_a = reps.clone().requires_grad_(True)
    vis = Visibility.for_batch(Rule(rule), batch, seq_len, valid=valid, external_local=external_local)
    tok_score, tok_logz = full_softmax_terms(logits, targets)
    lse_all, lse_pos = memory_logsumexp(reps_a, reps_a, targets, targets, vis, block_size=4)
    nll = joint_nll(tok_score, tok_logz, lse_all, lse_pos, valid=valid.reshape(-1))

    reps_b = reps.clone().requires_grad_(True)
    logits_b = logits.detach().clone().requires_grad_(True)
    flat = torch.arange(batch * seq_len)
    seg = (flat // seq_len).tolist()
    vflat = valid.reshape(-1).tolist()
    dense_vis = dense_visibility(rule, seg, flat.tolist(), seg, flat.tolist(), vflat, vflat, external_local)
    score_b, logz_b = full_softmax_terms(logits_b, targets)
    ref = dense_nll(reps_b, reps_b, targets, targets, score_b, logz_b, dense_vis, 1 / math.sqrt(dim), vflat)

    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    nll.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(reps_a.grad.double(), reps_b.grad.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), logits_b.grad.double(), rtol=1e-4, atol=1e-5)
    # padding never gets gradient, neither as query nor as key
    if pad_tail:
        assert reps_a.grad[~valid.reshape(-1)].abs().max() == 0


def test_no_visible_memory_is_exactly_cross_entropy():
    batch, seq_len, dim, vocab = 2, 5, 4, 11
    reps, targets, valid, logits = make_batch(batch, seq_len, dim, vocab, seed=2)
    vis = Visibility.for_batch(Rule.LOCAL, batch, seq_len)
    tok_score, tok_logz = full_softmax_terms(logits, targets)
    lse_all, lse_pos = memory_logsumexp(reps, reps, targets, targets, vis)
    nll = joint_nll(tok_score, tok_logz, lse_all, lse_pos)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    first = torch.arange(batch) * seq_len  # the first token of each segment has no memory
    assert torch.isneginf(lse_all[first]).all()
    assert torch.equal(nll[first], ce[first])


def test_row_with_memory_but_no_positive():
    # one query, two visible keys with other labels: numerator is the token term alone
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]])
    labels = torch.tensor([7, 8, 9])
    vis = Visibility.for_batch(Rule.LOCAL, 1, 3)
    lse_all, lse_pos = memory_logsumexp(q, q, labels, labels, vis, scale=1.0)
    assert torch.isneginf(lse_pos).all()
    expected = torch.logsumexp(q[2] @ q[:2].T, 0)
    torch.testing.assert_close(lse_all[2], expected)


def test_grouped_and_gathered_keys_with_detached_block():
    """Distinct query/key sets (as after a cross-rank gather): other-rank keys get no gradient."""
    dim, vocab = 6, 4
    g = torch.Generator().manual_seed(3)
    own = torch.randn(8, dim, generator=g, requires_grad=True)
    other = torch.randn(8, dim, generator=g)
    own_t = torch.randint(0, vocab, (8,), generator=g)
    other_t = torch.randint(0, vocab, (8,), generator=g)
    # stream: other rank first (positions 0..7, segments 0,1), then own (8..15, segments 2,3)
    keys = torch.cat([other, own])
    key_labels = torch.cat([other_t, own_t])
    key_seg = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)
    key_pos = torch.arange(16)
    group = torch.tensor([0] * 8 + [0] * 4 + [1] * 4)  # last own segment is alone in group 1
    for rule in ["long", "external"]:
        vis = Visibility(Rule(rule), key_seg[8:], key_pos[8:], key_seg, key_pos, query_group=group[8:], key_group=group)
        lse_all, lse_pos = memory_logsumexp(own, keys, key_labels, own_t, vis, block_size=3)
        logits = torch.zeros(8, vocab)
        s, z = full_softmax_terms(logits, own_t)
        nll = joint_nll(s, z, lse_all, lse_pos)
        ones = [True] * 16
        dvis = dense_visibility(rule, key_seg[8:].tolist(), key_pos[8:].tolist(), key_seg.tolist(), key_pos.tolist(),
                                ones[:8], ones, group_q=group[8:].tolist(), group_k=group.tolist())
        own_b = own.detach().clone().requires_grad_(True)
        ref = dense_nll(own_b, torch.cat([other, own_b]), key_labels, own_t, s, z, dvis, 1 / math.sqrt(dim), ones)
        torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-6)
        (g1,) = torch.autograd.grad(nll.sum(), own)
        (g2,) = torch.autograd.grad(ref.sum(), own_b)
        torch.testing.assert_close(g1.double(), g2.double(), rtol=1e-4, atol=1e-6)


def test_bf16_inputs_accumulate_in_fp32():
    batch, seq_len, dim, vocab = 2, 16, 32, 6
    reps, targets, valid, logits = make_batch(batch, seq_len, dim, vocab, seed=4)
    reps16 = reps.to(torch.bfloat16).requires_grad_(True)
    vis = Visibility.for_batch(Rule.LONG, batch, seq_len)
    lse_all, lse_pos = memory_logsumexp(reps16, reps16, targets, targets, vis, block_size=5)
    assert lse_all.dtype == torch.float32
    tok_score, tok_logz = full_softmax_terms(logits.to(torch.bfloat16), targets)
    nll = joint_nll(tok_score, tok_logz, lse_all, lse_pos)
    # reference on the same bf16-rounded inputs, in float64: only fp32 rounding error remains
    flat = list(range(batch * seq_len))
    seg = [i // seq_len for i in flat]
    ones = [True] * len(flat)
    dvis = dense_visibility("long", seg, flat, seg, flat, ones, ones)
    r = reps16.detach().double().requires_grad_(True)
    ref = dense_nll(r, r, targets, targets, tok_score.double(), tok_logz.double(), dvis, 1 / math.sqrt(dim), ones)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    nll.sum().backward()
    assert reps16.grad.dtype == torch.bfloat16
    ref.sum().backward()
    torch.testing.assert_close(reps16.grad.double(), r.grad, rtol=2e-2, atol=2e-3)


def test_block_size_does_not_change_result():
    reps, targets, valid, logits = make_batch(4, 9, 8, 3, seed=5, pad_tail=2)
    vis = Visibility.for_batch(Rule.LOCAL, 4, 9, valid=valid)
    a = memory_logsumexp(reps, reps, targets, targets, vis, block_size=1)
    b = memory_logsumexp(reps, reps, targets, targets, vis, block_size=1000)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_scored_memory_matches_explicit_sum():
    scores = torch.tensor([[0.5, 1.0, -2.0], [3.0, 0.0, 1.0]])
    labels = torch.tensor([[4, 5, 4], [1, 1, 2]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    targets = torch.tensor([4, 3])
    lse_all, lse_pos = scored_memory_logsumexp(scores, labels, targets, valid)
    torch.testing.assert_close(lse_all, torch.stack([torch.logsumexp(scores[0, :2], 0), torch.logsumexp(scores[1], 0)]))
    torch.testing.assert_close(lse_pos[0], scores[0, 0])
    assert torch.isneginf(lse_pos[1])


def test_adaptive_softmax_terms_match_fairseq_log_probs():
    from fairseq.modules import AdaptiveSoftmax

    torch.manual_seed(0)
    vocab, dim = 50, 12
    asm = AdaptiveSoftmax(vocab, dim, [10, 30], dropout=0.0, factor=2.0).eval()
    feats = torch.randn(2, 9, dim)
    targets = torch.randint(0, vocab, (2, 9))
    targets[0, :3] = torch.tensor([2, 15, 45])  # head, tail 1, tail 2
    score, logz = adaptive_softmax_terms(asm, feats, targets)
    full_logprob = asm.get_log_prob(feats, None).reshape(-1, vocab)
    expected = full_logprob.gather(1, targets.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(score - logz, expected, rtol=1e-5, atol=1e-5)
    head = asm.head(feats.reshape(-1, dim))
    torch.testing.assert_close(logz, torch.logsumexp(head, 1))
    # the loss with no memory equals fairseq's adaptive-softmax cross-entropy
    ce = logz - score
    torch.testing.assert_close(ce, -full_logprob.gather(1, targets.reshape(-1, 1)).squeeze(1), rtol=1e-5, atol=1e-5)

    # gradients of both outputs (weighted apart) against autograd through fairseq's own log-probs and head
    feats.requires_grad_(True)
    w_score, w_logz = torch.rand(18), torch.rand(18)
    score, logz = adaptive_softmax_terms(asm, feats, targets)
    params = [feats, *asm.parameters()]
    ours = torch.autograd.grad((w_score * score + w_logz * logz).sum(), params)
    flat, flat_targets = feats.reshape(-1, dim), targets.reshape(-1)
    head = asm.head(flat)  # dense reference: every cluster's log-softmax for every row
    ref_logz = torch.logsumexp(head, 1)
    head_logprob = torch.log_softmax(head, 1)
    ref_score = head_logprob.gather(1, flat_targets.clamp(max=9)[:, None]).squeeze(1)
    for cluster, (lo, hi) in enumerate([(10, 30), (30, 50)]):
        tail_logprob = torch.log_softmax(asm.tail[cluster](flat), 1)
        in_tail = (flat_targets >= lo) & (flat_targets < hi)
        word = tail_logprob.gather(1, (flat_targets - lo).clamp(0, hi - lo - 1)[:, None]).squeeze(1)
        ref_score = torch.where(in_tail, head_logprob[:, 10 + cluster] + word, ref_score)
    torch.testing.assert_close(ref_score, expected, rtol=1e-5, atol=1e-5)  # the reference is fairseq's log P
    ref_score = ref_score + ref_logz
    reference = torch.autograd.grad((w_score * ref_score + w_logz * ref_logz).sum(), params)
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", ["local", "long", "external"])
def test_fast_in_batch_path_equals_general_metadata_path(rule):
    batch, seq_len, dim, vocab = 3, 6, 5, 3
    reps, targets, valid, _ = make_batch(batch, seq_len, dim, vocab, seed=7, pad_tail=2)
    fast = Visibility.for_batch(Rule(rule), batch, seq_len, valid=valid)
    general = Visibility(Rule(rule), fast.query_segment, fast.query_position, fast.key_segment, fast.key_position,
                         query_valid=fast.query_valid, key_valid=fast.key_valid)
    a = reps.clone().requires_grad_(True)
    b = reps.clone().requires_grad_(True)
    out_fast = memory_logsumexp(a, a, targets, targets, fast, block_size=7)
    out_general = memory_logsumexp(b, b, targets, targets, general, block_size=7)
    for x, y in zip(out_fast, out_general):
        torch.testing.assert_close(x, y)
    weights = torch.randn(2, batch * seq_len)
    loss_fast = sum((w * torch.where(torch.isfinite(x), x, 0)).sum() for w, x in zip(weights, out_fast))
    loss_general = sum((w * torch.where(torch.isfinite(x), x, 0)).sum() for w, x in zip(weights, out_general))
    loss_fast.backward()
    loss_general.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_extreme_logits_take_the_exact_path():
    """Positives ~100 nats below the row maximum: the shared exp would underflow."""
    batch, seq_len, dim, vocab = 2, 8, 4, 3
    reps, targets, valid, logits = make_batch(batch, seq_len, dim, vocab, seed=8)
    reps = reps * 12.0  # |s| up to several hundred
    a = reps.clone().requires_grad_(True)
    vis = Visibility.for_batch(Rule.LONG, batch, seq_len)
    lse_all, lse_pos = memory_logsumexp(a, a, targets, targets, vis, scale=1.0)
    logits = logits * 0 - 400.0  # token term negligible, so the memory positives matter
    tok_score, tok_logz = full_softmax_terms(logits, targets)
    nll = joint_nll(tok_score, tok_logz, lse_all, lse_pos)
    flat = list(range(batch * seq_len))
    seg = [i // seq_len for i in flat]
    ones = [True] * len(flat)
    dvis = dense_visibility("long", seg, flat, seg, flat, ones, ones)
    b = reps.double().clone().requires_grad_(True)
    ref = dense_nll_logspace(b, targets, tok_score.double(), tok_logz.double(), dvis)
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(nll.double(), ref, rtol=1e-4, atol=1e-3)
    nll.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-3)


def dense_nll_logspace(reps, targets, token_score, token_logz, vis):
    """Like dense_nll with scale 1, but in log space (float64 exp overflows at these scales)."""
    s = reps @ reps.T
    out = []
    for i in range(len(targets)):
        pos = vis[i] & (targets == targets[i])
        num = torch.logsumexp(torch.cat([token_score[i : i + 1], s[i][pos]]), 0)
        den = torch.logsumexp(torch.cat([token_logz[i : i + 1], s[i][vis[i]]]), 0)
        out.append(den - num)
    return torch.stack(out)


# ----------------------------------------------------------------------------- tile schedules and compiled kernels


def dense_case(rule, external_local, batch, seq_len, dim, vocab, seed, pad_tail):
    """(reps, targets, valid, token terms, dense NLL function of reps) for an in-batch memory."""
    reps, targets, valid, logits = make_batch(batch, seq_len, dim, vocab, seed=seed, pad_tail=pad_tail)
    tok_score, tok_logz = full_softmax_terms(logits, targets)
    flat = list(range(batch * seq_len))
    seg = [i // seq_len for i in flat]
    vflat = valid.reshape(-1).tolist()
    dvis = dense_visibility(rule, seg, flat, seg, flat, vflat, vflat, external_local)

    def reference(r):
        return dense_nll(r, r, targets, targets, tok_score.double(), tok_logz.double(), dvis, 1 / math.sqrt(dim), vflat)

    return reps, targets, valid, (tok_score.detach(), tok_logz.detach()), reference


def trime_nll(reps, targets, vis, token_terms, block_size):
    lse_all, lse_pos = memory_logsumexp(reps, reps, targets, targets, vis, block_size=block_size)
    return joint_nll(*token_terms, lse_all, lse_pos, valid=vis.query_valid)


@pytest.fixture
def compile_state():
    """trime.loss_compile; its compile mode and a failure that switched compiling off are restored after the test."""
    from trime import loss_compile

    mode, broken = loss_compile.compile_mode(), loss_compile.STATE.broken
    yield loss_compile
    loss_compile.set_compile(mode)
    loss_compile.STATE.broken = broken


@pytest.mark.parametrize(
    "rule,external_local", [("long", True), ("external", True), ("external", False), ("local", True)]
)
@pytest.mark.parametrize("block_size", [5, 16, 64])
def test_tile_schedules_match_dense(rule, external_local, block_size):
    """Several tiles per call: the in-batch external memory uses each score for both sides (one or
    more segments per tile), the long memory splits its rows finely; padding at the end of a row."""
    from trime.loss import _Problem

    batch, seq_len, dim, vocab = 5, 8, 6, 3
    reps, targets, valid, terms, reference = dense_case(rule, external_local, batch, seq_len, dim, vocab, 11, 3)
    vis = Visibility.for_batch(Rule(rule), batch, seq_len, valid=valid, external_local=external_local)
    schedule = _Problem.build(reps, reps, targets, targets, vis, 1.0, block_size, True).schedule()
    assert schedule == {"long": "general", "local": "local_batched", "external": "symmetric"}[rule]
    a = reps.clone().requires_grad_(True)
    nll = trime_nll(a, targets, vis, terms, block_size)
    b = reps.double().requires_grad_(True)
    ref = reference(b)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    nll.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
    assert a.grad[~valid.reshape(-1)].abs().max() == 0


@pytest.mark.parametrize("rule", ["long", "external"])
def test_distinct_key_tensor_takes_the_general_path(rule):
    """Keys equal to the queries but a different tensor (no symmetric reuse): same values, split gradients."""
    batch, seq_len, dim, vocab = 3, 6, 5, 3
    reps, targets, valid, terms, reference = dense_case(rule, True, batch, seq_len, dim, vocab, 12, 2)
    vis = Visibility.for_batch(Rule(rule), batch, seq_len, valid=valid)
    q = reps.clone().requires_grad_(True)
    k = reps.clone().requires_grad_(True)
    lse_all, lse_pos = memory_logsumexp(q, k, targets, targets, vis, block_size=4)
    nll = joint_nll(*terms, lse_all, lse_pos, valid=vis.query_valid)
    b = reps.double().requires_grad_(True)
    ref = reference(b)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    nll.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close((q.grad + k.grad).double(), b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule,external_local", [("long", True), ("external", True), ("external", False)])
def test_compiled_kernels_equal_eager_and_dense(compile_state, rule, external_local):
    """torch.compile'd tile kernels (inductor C++ here) give the eager results within fp32 round-off.

    Every compiled kernel is built here (the local memory's batched tiles always run eagerly):
    about 30 s of CPU on a cold inductor cache, a few seconds on a warm one.
    """
    batch, seq_len, dim, vocab = 6, 16, 8, 4
    reps, targets, valid, terms, reference = dense_case(rule, external_local, batch, seq_len, dim, vocab, 13, 5)
    vis = Visibility.for_batch(Rule(rule), batch, seq_len, valid=valid, external_local=external_local)
    results = {}
    for mode in ("never", "always"):
        compile_state.set_compile(mode)
        a = reps.clone().requires_grad_(True)
        nll = trime_nll(a, targets, vis, terms, block_size=32)
        nll.sum().backward()
        results[mode] = (nll.detach(), a.grad)
    assert compile_state.STATE.broken is None, compile_state.STATE.broken  # it really compiled
    for x, y in zip(results["always"], results["never"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    b = reps.double().requires_grad_(True)
    ref = reference(b)
    ref.sum().backward()
    torch.testing.assert_close(results["always"][0].double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["always"][1].double(), b.grad, rtol=1e-4, atol=1e-5)


def test_compiled_general_path_with_groups_and_detached_keys(compile_state):
    compile_state.set_compile("always")
    test_grouped_and_gathered_keys_with_detached_block()
    assert compile_state.STATE.broken is None


def test_missing_compiler_falls_back_to_eager_and_logs_once(compile_state, monkeypatch, caplog):
    reps, targets, valid, terms, reference = dense_case("long", True, 3, 8, 4, 3, 14, 0)
    vis = Visibility.for_batch(Rule.LONG, 3, 8, valid=valid)
    compile_state.set_compile("always")
    compile_state.STATE.broken = None
    monkeypatch.setattr(compile_state, "compiler_problem", lambda device: "no C++ compiler found (g++)")
    with caplog.at_level("WARNING", logger="trime.loss_compile"):
        first = trime_nll(reps, targets, vis, terms, 4)
        second = trime_nll(reps, targets, vis, terms, 4)
    assert [r.getMessage() for r in caplog.records].count(
        "trime.loss: memory kernels run eagerly (not compiled): no C++ compiler found (g++)") == 1
    torch.testing.assert_close(first.double(), reference(reps.double()), rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


def test_failing_compile_falls_back_to_eager(compile_state, monkeypatch, caplog):
    reps, targets, valid, terms, reference = dense_case("external", True, 3, 8, 4, 3, 15, 2)
    vis = Visibility.for_batch(Rule.EXTERNAL, 3, 8, valid=valid)

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InductorError: C++ compile failed\nlong log")

        return call

    compile_state.set_compile("always")
    compile_state.STATE.broken = None
    monkeypatch.setattr(compile_state.STATE, "compiled", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    a = reps.clone().requires_grad_(True)
    with caplog.at_level("WARNING", logger="trime.loss_compile"):
        nll = trime_nll(a, targets, vis, terms, 8)
    assert "InductorError: C++ compile failed" in caplog.text and "long log" not in caplog.text
    b = reps.double().requires_grad_(True)
    ref = reference(b)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    nll.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


def test_auto_compiles_once_small_calls_add_up(compile_state, monkeypatch):
    """"auto": a big call compiles at once; small ones (evaluation's per-window calls) stay eager until
    their pairs add up to AUTO_MIN_TOTAL_PAIRS, then compile too."""
    compile_state.set_compile("auto")
    compile_state.STATE.broken = None
    monkeypatch.setattr(compile_state, "compiler_problem", lambda device: None)
    monkeypatch.setattr(compile_state.STATE, "eager_pairs", 0)
    monkeypatch.setattr(compile_state, "AUTO_MIN_TOTAL_PAIRS", 1000)
    cpu = torch.device("cpu")
    assert compile_state.use_compiled(cpu, compile_state.AUTO_MIN_PAIRS)
    assert [compile_state.use_compiled(cpu, 600) for _ in range(3)] == [False, False, True]
    compile_state.set_compile("never")
    assert not compile_state.use_compiled(cpu, compile_state.AUTO_MIN_PAIRS)


def test_compile_mode_values(compile_state):
    for given, mode in (("1", "always"), ("off", "never"), ("AUTO", "auto")):
        compile_state.set_compile(given)
        assert compile_state.compile_mode() == mode
    with pytest.raises(ValueError, match="auto, always or never"):
        compile_state.set_compile("sometimes")


# ----------------------------------------------------------------------------- memory_joint_nll (one-pass gradient)


def joint_case(rule, external_local, batch=4, seq_len=7, dim=6, vocab=3, seed=21, pad_tail=3):
    """(reps, targets, valid, token score, token log-partition, dense NLL function of (q, k, score, logz))."""
    reps, targets, valid, logits = make_batch(batch, seq_len, dim, vocab, seed=seed, pad_tail=pad_tail)
    score, logz = (t.detach() for t in full_softmax_terms(logits, targets))
    flat = list(range(batch * seq_len))
    seg = [i // seq_len for i in flat]
    vflat = valid.reshape(-1).tolist()
    dvis = dense_visibility(rule, seg, flat, seg, flat, vflat, vflat, external_local)

    def reference(q, k, s, z):
        return dense_nll(q, k, targets, targets, s, z, dvis, 1 / math.sqrt(dim), vflat)

    return reps, targets, valid, score, logz, reference


class PathSpy:
    """Counts calls of trime.loss's recomputing backward and of the one-pass forward."""

    def __init__(self, monkeypatch):
        import trime.loss as loss_module

        self.calls = {"_backward": 0, "_one_pass": 0}
        for name in self.calls:
            original = getattr(loss_module, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(loss_module, name, counted)


JOINT_RULES = [("local", True), ("long", True), ("external", True), ("external", False)]


@pytest.mark.parametrize("rule,external_local", JOINT_RULES)
@pytest.mark.parametrize("separate_keys", [False, True])
@pytest.mark.parametrize("upstream", ["sum", "mean", "weighted"])
def test_memory_joint_nll_matches_dense(monkeypatch, rule, external_local, separate_keys, upstream):
    """Value and gradients (queries, keys, token score and log-partition) against the float64 reference;
    one pass for a uniform upstream gradient, the recomputing backward for any other."""
    from trime.loss import memory_joint_nll

    reps, targets, valid, score, logz, reference = joint_case(rule, external_local)
    n = reps.shape[0]
    vis = Visibility.for_batch(Rule(rule), 4, 7, valid=valid, external_local=external_local)
    weights = {"sum": torch.ones(n), "mean": torch.full((n,), 1.0 / n),
               "weighted": torch.linspace(-1.0, 2.0, n)}[upstream]
    spy = PathSpy(monkeypatch)
    q = reps.clone().requires_grad_(True)
    k = reps.clone().requires_grad_(True) if separate_keys else q
    s, z = score.clone().requires_grad_(True), logz.clone().requires_grad_(True)
    nll = memory_joint_nll(q, k, targets, targets, vis, s, z, valid=valid.reshape(-1), block_size=5)
    assert nll.dtype == torch.float32
    loss = {"sum": nll.sum(), "mean": nll.mean(), "weighted": (nll * weights).sum()}[upstream]
    loss.backward()

    qb = reps.double().requires_grad_(True)
    kb = reps.double().requires_grad_(True) if separate_keys else qb
    sb, zb = score.double().requires_grad_(True), logz.double().requires_grad_(True)
    ref = reference(qb, kb, sb, zb)
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    assert (nll[~valid.reshape(-1)] == 0).all()
    torch.testing.assert_close(q.grad.double(), qb.grad, rtol=1e-4, atol=1e-5)
    if separate_keys:
        torch.testing.assert_close(k.grad.double(), kb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), sb.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), zb.grad, rtol=1e-4, atol=1e-6)
    assert q.grad[~valid.reshape(-1)].abs().max() == 0
    symmetric = rule == "external" and not separate_keys
    assert spy.calls["_one_pass"] == (0 if symmetric else 1)
    assert spy.calls["_backward"] == (1 if symmetric or upstream == "weighted" else 0)


@pytest.mark.parametrize("rule,external_local", JOINT_RULES)
def test_memory_joint_nll_equals_two_pass_loss(rule, external_local):
    """Same values and gradients as memory_logsumexp + joint_nll, within fp32 round-off."""
    from trime.loss import memory_joint_nll

    reps, targets, valid, score, logz, _ = joint_case(rule, external_local, batch=5, seq_len=9, dim=8, seed=22)
    vis = Visibility.for_batch(Rule(rule), 5, 9, valid=valid, external_local=external_local)
    out = []
    for fused in (True, False):
        q = reps.clone().requires_grad_(True)
        if fused:
            nll = memory_joint_nll(q, q, targets, targets, vis, score, logz, valid=valid, block_size=16)
        else:
            lse_all, lse_pos = memory_logsumexp(q, q, targets, targets, vis, block_size=16)
            nll = joint_nll(score, logz, lse_all, lse_pos, valid=valid.reshape(-1))
        nll.sum().backward()
        out.append((nll.detach(), q.grad))
    for x, y in zip(*out):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_memory_joint_nll_token_grads_only_and_no_grad():
    """Token terms requiring grad with constant memory inputs, memory inputs alone, and eval (no grad)."""
    from trime.loss import memory_joint_nll

    reps, targets, valid, score, logz, reference = joint_case("long", True)
    vis = Visibility.for_batch(Rule.LONG, 4, 7, valid=valid)
    keep = valid.reshape(-1)
    sb, zb = score.double().requires_grad_(True), logz.double().requires_grad_(True)
    rb = reps.double().requires_grad_(True)
    ref = reference(rb, rb, sb, zb)
    ref.sum().backward()
    # token terms only
    s, z = score.clone().requires_grad_(True), logz.clone().requires_grad_(True)
    nll = memory_joint_nll(reps, reps, targets, targets, vis, s, z, valid=keep, block_size=4)
    nll.sum().backward()
    torch.testing.assert_close(s.grad.double(), sb.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), zb.grad, rtol=1e-4, atol=1e-6)
    # memory inputs only
    r = reps.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(memory_joint_nll(r, r, targets, targets, vis, score, logz, valid=keep).sum(), r)
    torch.testing.assert_close(g.double(), rb.grad, rtol=1e-4, atol=1e-5)
    # evaluation
    with torch.no_grad():
        nll = memory_joint_nll(r, r, targets, targets, vis, score, logz, valid=keep)
    assert not nll.requires_grad
    torch.testing.assert_close(nll.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_memory_joint_nll_gathered_keys_with_groups(monkeypatch):
    """General path with groups and a detached block of other-rank keys (one pass; no grad to constants)."""
    from trime.loss import memory_joint_nll

    dim, vocab = 6, 4
    g = torch.Generator().manual_seed(3)
    own = torch.randn(8, dim, generator=g, requires_grad=True)
    other = torch.randn(8, dim, generator=g)
    own_t = torch.randint(0, vocab, (8,), generator=g)
    key_labels = torch.cat([torch.randint(0, vocab, (8,), generator=g), own_t])
    key_seg = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)
    key_pos = torch.arange(16)
    group = torch.tensor([0] * 12 + [1] * 4)
    s, z = full_softmax_terms(torch.randn(8, vocab, generator=g), own_t)
    ones = [True] * 16
    for rule in ["long", "external"]:
        spy = PathSpy(monkeypatch)
        vis = Visibility(Rule(rule), key_seg[8:], key_pos[8:], key_seg, key_pos, query_group=group[8:], key_group=group)
        nll = memory_joint_nll(own, torch.cat([other, own]), key_labels, own_t, vis, s, z, block_size=3)
        dvis = dense_visibility(rule, key_seg[8:].tolist(), key_pos[8:].tolist(), key_seg.tolist(), key_pos.tolist(),
                                ones[:8], ones, group_q=group[8:].tolist(), group_k=group.tolist())
        own_b = own.detach().double().requires_grad_(True)
        ref = dense_nll(own_b, torch.cat([other.double(), own_b]), key_labels, own_t, s, z, dvis, 1 / math.sqrt(dim),
                        ones)
        torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-6)
        (g1,) = torch.autograd.grad(nll.sum(), own)
        (g2,) = torch.autograd.grad(ref.sum(), own_b)
        torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-6)
        assert spy.calls == {"_one_pass": 1, "_backward": 0}


@pytest.mark.parametrize("rule,external_local", [("long", True), ("external", False)])
def test_memory_joint_nll_compiled_equals_eager_and_dense(compile_state, rule, external_local):
    """The compiled one-pass tile kernel (separate keys: the general path also for external) and its eager twin."""
    from trime.loss import memory_joint_nll

    reps, targets, valid, score, logz, reference = joint_case(rule, external_local, batch=6, seq_len=16, dim=8,
                                                              vocab=4, seed=23, pad_tail=5)
    vis = Visibility.for_batch(Rule(rule), 6, 16, valid=valid, external_local=external_local)
    results = {}
    for mode in ("never", "always"):
        compile_state.set_compile(mode)
        q = reps.clone().requires_grad_(True)
        k = reps.clone().requires_grad_(True)
        nll = memory_joint_nll(q, k, targets, targets, vis, score, logz, valid=valid, block_size=32)
        nll.sum().backward()
        results[mode] = (nll.detach(), q.grad, k.grad)
    assert compile_state.STATE.broken is None, compile_state.STATE.broken  # it really compiled
    for x, y in zip(results["always"], results["never"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    qb, kb = reps.double().requires_grad_(True), reps.double().requires_grad_(True)
    ref = reference(qb, kb, score.double(), logz.double())
    ref.sum().backward()
    torch.testing.assert_close(results["always"][0].double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["always"][1].double(), qb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["always"][2].double(), kb.grad, rtol=1e-4, atol=1e-5)


def test_memory_joint_nll_bf16_and_empty_memory():
    """bf16 queries: fp32 nll, bf16 gradients near the reference; a row without visible keys is exactly CE."""
    from trime.loss import memory_joint_nll

    reps, targets, valid, score, logz, reference = joint_case("long", True, batch=2, seq_len=16, dim=32, vocab=6,
                                                              seed=24, pad_tail=0)
    vis = Visibility.for_batch(Rule.LONG, 2, 16)
    r16 = reps.to(torch.bfloat16).requires_grad_(True)
    nll = memory_joint_nll(r16, r16, targets, targets, vis, score, logz, block_size=5)
    assert nll.dtype == torch.float32
    assert nll[0] == (logz - score)[0]  # the first token sees no memory
    nll.sum().backward()
    assert r16.grad.dtype == torch.bfloat16
    rb = r16.detach().double().requires_grad_(True)
    ref = reference(rb, rb, score.double(), logz.double())
    ref.sum().backward()
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r16.grad.double(), rb.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize(
    "rule,external_local", [("long", True), ("external", True), ("external", False), ("local", True)]
)
@pytest.mark.parametrize("mode", ["never", "always"])
def test_logsumexp_at_scales_equals_one_call_per_scale(compile_state, rule, external_local, mode):
    """One pass at several scales (evaluation's temperature trials) = separate calls, on every schedule:
    in-batch local / symmetric external / general long, plus a general call with other keys and groups;
    eager and compiled."""
    compile_state.set_compile(mode)
    torch.manual_seed(3)
    batch, seq_len, dim = 3, 10, 8
    reps = torch.randn(batch * seq_len, dim)
    targets = torch.randint(0, 4, (batch * seq_len,))
    valid = torch.rand(batch, seq_len) > 0.2
    scales = [0.1, 0.35, 1.0, 2.5]
    vis = Visibility.for_batch(Rule(rule), batch, seq_len, valid=valid, external_local=external_local)
    cases = [(reps, reps, targets, targets, vis)]
    if rule == "long":  # queries after a separate FIFO of keys, in two groups
        keys, key_labels = torch.randn(17, dim), torch.randint(0, 4, (17,))
        general = Visibility(
            rule=Rule.LONG, query_segment=torch.zeros(6, dtype=torch.long), query_position=torch.arange(20, 26),
            key_segment=torch.zeros(17, dtype=torch.long), key_position=torch.arange(17),
            query_group=torch.tensor([0, 0, 0, 1, 1, 1]), key_group=(torch.arange(17) > 8).long(),
        )
        cases.append((reps[:6], keys, key_labels, targets[:6], general))
    for queries, keys, key_labels, query_targets, visibility in cases:
        lse_all, lse_pos = memory_logsumexp_at_scales(queries, keys, key_labels, query_targets, visibility, scales,
                                                      block_size=7)
        assert lse_all.shape == lse_pos.shape == (len(scales), queries.shape[0])
        for i, scale in enumerate(scales):
            ref_all, ref_pos = memory_logsumexp(queries, keys, key_labels, query_targets, visibility, scale=scale,
                                                block_size=7)
            torch.testing.assert_close(lse_all[i], ref_all, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse_pos[i], ref_pos, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(lse_all).any() and not torch.equal(lse_all[0], lse_all[-1])


# ----------------------------------------------------------------------------- one way to build a memory; module surface


def test_memory_scale_is_one_over_sqrt_dim_times_temperature():
    from trime.errors import TrimeError
    from trime.loss import memory_scale

    assert memory_scale(64) == 1 / 8
    assert memory_scale(16, 2.0) == 1 / 8
    for bad in (0.0, -1.0):
        with pytest.raises(TrimeError, match="temperature must be > 0"):
            memory_scale(16, bad)


@pytest.mark.parametrize("rule,external_local", [("local", True), ("long", True), ("external", False)])
def test_in_batch_memory_flattens_the_batch_and_restricts_queries(rule, external_local):
    """The assembled inputs give what a hand-built for_batch call gives; a query mask leaves only its rows
    (the others see nothing), every valid token still being a key."""
    from trime.loss import in_batch_memory, memory_scale

    batch, seq_len, dim, vocab = 3, 6, 4, 3
    reps, targets, valid, _ = make_batch(batch, seq_len, dim, vocab, seed=31, pad_tail=2)
    reps3, targets2 = reps.view(batch, seq_len, dim), targets.view(batch, seq_len)
    memory = in_batch_memory(reps3, targets2, valid, Rule(rule), external_local, scale=0.3, block_size=4)
    assert memory.queries is memory.keys and memory.queries.shape == (batch * seq_len, dim)
    vis = Visibility.for_batch(Rule(rule), batch, seq_len, valid=valid, external_local=external_local)
    expected = memory_logsumexp(reps, reps, targets, targets, vis, scale=0.3, block_size=4)
    for x, y in zip(memory.logsumexp(), expected):
        assert torch.equal(x, y)

    scored = valid.clone()
    scored[:, :2] = False  # only later positions are queries; the first two stay keys
    masked = in_batch_memory(reps3, targets2, valid, Rule(rule), external_local, query_valid=scored)
    lse_all, lse_pos = masked.logsumexp_at_scales([memory_scale(dim)])
    full_all, full_pos = memory_logsumexp(reps, reps, targets, targets, vis)
    rows = scored.reshape(-1)
    assert torch.isneginf(lse_all[0, ~rows]).all() and torch.isneginf(lse_pos[0, ~rows]).all()
    torch.testing.assert_close(lse_all[0, rows], full_all[rows], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse_pos[0, rows], full_pos[rows], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(lse_all[0, rows]).any()


def test_kernel_registry_and_public_names(compile_state, monkeypatch):
    """Kernels are looked up in the explicit registry only (compiled: through their compiled twin, built once);
    __all__ names every public entry point."""
    import trime.loss as loss_module

    eager = compile_state.Kernels(loss_module._KERNELS, compiled=False)
    assert eager.rows_lse is loss_module._rows_lse
    with pytest.raises(AttributeError, match="no kernel"):
        _ = eager._structure_bias  # a module function, but not a registered kernel
    built = []

    def fake_compile(fn, **kwargs):
        built.append(fn)
        return lambda *args: fn(*args) + 1

    def double(x):
        return 2 * x

    compile_state.STATE.broken = None
    monkeypatch.setattr(compile_state.STATE, "compiled", {})
    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = compile_state.Kernels({"double": double}, compiled=True)
    assert [compiled.double(torch.tensor(3.0)).item() for _ in range(2)] == [7.0, 7.0]
    assert built == [double] and compile_state.STATE.compiled == {double: compile_state.STATE.compiled[double]}
    for name in loss_module.__all__:
        assert hasattr(loss_module, name), name
    assert {"memory_logsumexp_at_scales", "memory_scale", "in_batch_memory"} <= set(loss_module.__all__)
    assert not hasattr(loss_module, "set_compile") and not hasattr(loss_module, "full_softmax_terms")


def test_math_modules_import_no_framework():
    """trime.loss, trime.loss_compile and trime.heads import neither fairseq nor transformers, at any level."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "trime"
    for name in ("loss.py", "loss_compile.py", "heads.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                assert module.split(".")[0] not in ("fairseq", "transformers"), (name, module)


def test_token_head_terms_duck_types_the_model():
    """A full-softmax decoder gets full_softmax_terms of its output; an adaptive one its adaptive terms."""
    from types import SimpleNamespace

    from trime.heads import token_head_terms

    g = torch.Generator().manual_seed(5)
    logits, targets = torch.randn(2, 4, 7, generator=g), torch.randint(0, 7, (2, 4), generator=g)
    plain = SimpleNamespace(decoder=SimpleNamespace())
    for x, y in zip(token_head_terms(plain, (logits,), targets), full_softmax_terms(logits, targets)):
        assert torch.equal(x, y)
    calls = []

    class Head:
        cutoff = [7]

        def __call__(self, features, flat_targets):
            calls.append(features.shape)
            return [features], [flat_targets]

    adaptive = SimpleNamespace(decoder=SimpleNamespace(adaptive_softmax=Head()))
    score, logz = token_head_terms(adaptive, (logits,), targets)
    assert calls == [(8, 7)]
    torch.testing.assert_close(logz, torch.logsumexp(logits.reshape(8, 7), 1))
