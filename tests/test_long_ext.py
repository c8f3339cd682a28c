"""Criteria ``trime_long_loss_same_device``, ``trime_long_loss`` and ``trime_ext_loss``.

Every loss is compared with the dense brute-force reference of ``test_loss`` on keys
taken from a forward hook on the last layer's ``final_layer_norm`` of a real tiny
fairseq model. The two gathering criteria are also run on two CPU processes (gloo,
``_dist_worker.py``) and compared with one process on the concatenated batch: the
values match exactly; the gradients match a reference in which each rank's queries see
the other rank's keys as constants (the original's, and this plugin's, design).
"""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trime.criterions.trime_long_loss as long_module
from tests._dist_worker import (
    MODEL_ROWS,
    REP_SHAPES,
    build,
    model_case_batch,
    rep_case_data,
    slice_batch,
)
from tests.dense_reference import dense_nll, dense_visibility
from trime.errors import TrimeError

REPO = Path(__file__).resolve().parent.parent  # workers run as `python -m tests.NAME` from here
PYTHON = sys.executable


# ----------------------------------------------------------------------------- dense references


def hooked_forward(model, sample):
    """(reps (B, T, C), logits (B, T, V)) with reps from a hook on the last layer's final_layer_norm."""
    store = {}
    norm = model.decoder.layers[-1].final_layer_norm
    handle = norm.register_forward_hook(lambda m, i, o: store.__setitem__("reps", o))
    net_output = model(**sample["net_input"])
    handle.remove()
    return store["reps"].transpose(0, 1), net_output[0]


def dense_rank_losses(model, sample, rule, rank_rows, external_local=True, detach_other_ranks=True):
    """Dense TRIME loss of each rank's rows over the whole batch (one stream, one group).

    With ``detach_other_ranks`` the keys outside a rank's rows are constants for that
    rank's loss, as with gathered keys.
    """
    reps, logits = hooked_forward(model, sample)
    batch, seq_len, dim = reps.shape
    flat = reps.reshape(batch * seq_len, dim)
    targets = sample["target"].reshape(-1)
    valid = targets.ne(1)
    log_probs = logits.reshape(batch * seq_len, -1).double()
    logz = torch.logsumexp(log_probs, dim=1)
    score = log_probs.gather(1, targets[:, None]).squeeze(1)
    segment = torch.arange(batch * seq_len) // seq_len
    position = torch.arange(batch * seq_len)
    losses = []
    for rows in rank_rows:
        own = torch.isin(segment, torch.as_tensor(list(rows)))
        keys = torch.where(own[:, None], flat, flat.detach()) if detach_other_ranks else flat
        vis = dense_visibility(rule, segment[own], position[own], segment, position, valid[own], valid, external_local)
        nll = dense_nll(
            flat[own], keys, targets, targets[own], score[own], logz[own], vis, 1 / math.sqrt(dim), valid[own]
        )
        losses.append(nll.sum())
    return losses


def param_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(actual, expected, atol=1e-5):
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name].double(), expected[name].double(), atol=atol, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- single process


def test_same_device_matches_dense_long_visibility(dict_dir):
    task, model, criterion = build(dict_dir, "trime_long_loss_same_device", ["--allow-random-batches"], task="language_modeling")
    sample = model_case_batch(task.source_dictionary)
    loss, sample_size, log = criterion(model, sample)
    assert sample_size == sample["ntokens"] and "norm_loss" in log
    grads = param_grads(model, loss)
    (expected,) = dense_rank_losses(model, sample, "long", [range(5)], detach_other_ranks=False)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads, param_grads(model, expected))


def test_long_loss_sees_more_than_local_loss(dict_dir):
    task, model, long_crit = build(dict_dir, "trime_long_loss_same_device", ["--allow-random-batches"], task="language_modeling")
    _, _, local_crit = build(dict_dir, "trime_loss", task="language_modeling")
    sample = model_case_batch(task.source_dictionary)
    assert not torch.isclose(long_crit(model, sample)[0], local_crit(model, sample)[0])
    # the first row has no earlier rows: its loss is the same under both rules
    first = slice_batch(sample, [0])
    torch.testing.assert_close(long_crit(model, first)[0], local_crit(model, first)[0])


def test_long_loss_single_process_equals_same_device(dict_dir):
    for task_name, extra in (("language_modeling", ["--allow-random-batches"]), ("trime_lm", ["--keep-order"])):
        task, model, long_crit = build(dict_dir, "trime_long_loss", extra, task=task_name)
        _, _, same_crit = build(dict_dir, "trime_long_loss_same_device", extra, task=task_name)
        sample = model_case_batch(task.source_dictionary)
        torch.testing.assert_close(long_crit(model, sample)[0], same_crit(model, sample)[0])


@pytest.mark.parametrize("criterion_name", ["trime_long_loss_same_device", "trime_long_loss", "trime_ext_loss"])
def test_cross_segment_criteria_refuse_random_batches(dict_dir, criterion_name):
    with pytest.raises(TrimeError, match=f"^trime: error: {criterion_name} trains on .*--allow-random-batches"):
        build(dict_dir, criterion_name, task="language_modeling")
    with pytest.raises(TrimeError, match="--allow-random-batches"):  # trime_lm without an order is random too
        build(dict_dir, criterion_name, task="trime_lm")


def test_long_loss_refuses_world_not_divisible_by_group(dict_dir, monkeypatch):
    task, model, criterion = build(
        dict_dir, "trime_long_loss", ["--keep-order", "--max-tokens", "8", "--train-mem-size", "16"]
    )
    assert criterion.group_size == 2
    monkeypatch.setattr(long_module, "world_size_and_rank", lambda: (3, 0))
    with pytest.raises(TrimeError, match="world size is 3"):
        criterion(model, model_case_batch(task.source_dictionary))


@pytest.mark.parametrize("ratio,training,local_on", [(0.0, True, True), (1.0, True, False), (1.0, False, True)])
def test_ext_single_process_matches_dense(dict_dir, ratio, training, local_on):
    task, model, criterion = build(
        dict_dir, "trime_ext_loss", ["--allow-random-batches", "--cross-sent-ratio", str(ratio)], task="language_modeling"
    )
    sample = model_case_batch(task.source_dictionary)
    model.train(training)
    loss, _, log = criterion(model, sample)
    assert log["local_draws"] == int(training) and log["local_off"] == int(not local_on)
    grads = param_grads(model, loss)
    (expected,) = dense_rank_losses(model, sample, "external", [range(5)], local_on, detach_other_ranks=False)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads, param_grads(model, expected))


def test_ext_coin_is_seeded_per_rank_and_logged(dict_dir, monkeypatch):
    from fairseq import metrics

    _, _, first = build(dict_dir, "trime_ext_loss", ["--allow-random-batches", "--cross-sent-ratio", "0.3", "--seed", "5"])
    _, _, again = build(dict_dir, "trime_ext_loss", ["--allow-random-batches", "--cross-sent-ratio", "0.3", "--seed", "5"])
    draws = [first.draw_local_off() for _ in range(400)]
    assert draws == [again.draw_local_off() for _ in range(400)]
    assert 0.22 < sum(draws) / len(draws) < 0.38
    monkeypatch.setattr("trime.criterions.trime_ext_loss.world_size_and_rank", lambda: (2, 1))
    _, _, other_rank = build(dict_dir, "trime_ext_loss", ["--allow-random-batches", "--cross-sent-ratio", "0.3", "--seed", "5"])
    assert [other_rank.draw_local_off() for _ in range(400)] != draws
    logs = [{"loss": 1.0, "sample_size": 1, "ntokens": 1, "local_off": off, "local_draws": 1} for off in (1, 0, 0, 1)]
    with metrics.aggregate() as agg:
        first.reduce_metrics(logs)
        assert agg.get_smoothed_values()["local_off"] == pytest.approx(0.5)


def test_ext_ratio_out_of_range_is_refused(dict_dir):
    with pytest.raises(TrimeError, match="cross-sent-ratio"):
        build(dict_dir, "trime_ext_loss", ["--allow-random-batches", "--cross-sent-ratio", "1.5"])


def test_gathering_criteria_accept_a_marked_dummy_batch_alone(dict_dir):
    from trime.distributed import DUMMY_BATCH_KEY

    task, model, criterion = build(dict_dir, "trime_ext_loss", ["--allow-random-batches", "--cross-sent-ratio", "0"])
    sample = dict(model_case_batch(task.source_dictionary), **{DUMMY_BATCH_KEY: True})
    loss, _, _ = criterion(model, sample)
    assert torch.isfinite(loss)  # no keys: plain cross-entropy, never NaN


# ----------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(dict_dir, tmp_path_factory):
    """Run both ranks of ``_dist_worker.py`` once; their saved results, indexed by rank."""
    out_dir = tmp_path_factory.mktemp("dist")
    init = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "tests._dist_worker", str(rank), "2", init, dict_dir, str(out_dir / f"rank{rank}.pt")],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("distributed workers timed out")
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-3000:]}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def dense_rep_case(rule, external_local=True):
    """Per-rank losses and reps gradients of the representation-level case, by the dense reference."""
    data = rep_case_data()
    reps = [d["reps"].reshape(-1, d["reps"].shape[-1]).clone().requires_grad_(True) for d in data]
    keys_live = torch.cat(reps)
    targets = torch.cat([d["targets"].reshape(-1) for d in data])
    valid = torch.cat([d["valid"].reshape(-1) for d in data])
    score = torch.cat([d["token_score"] for d in data])
    logz = torch.cat([d["token_logz"] for d in data])
    segment = torch.cat(
        [torch.arange(b * t) // t + sum(s[0] for s in REP_SHAPES[:r]) for r, (b, t) in enumerate(REP_SHAPES)]
    )
    position = torch.arange(len(targets))
    rank_of = torch.cat([torch.full((b * t,), r) for r, (b, t) in enumerate(REP_SHAPES)])
    losses = []
    for rank in range(len(REP_SHAPES)):
        own = rank_of == rank
        keys = torch.where(own[:, None], keys_live, keys_live.detach())
        vis = dense_visibility(rule, segment[own], position[own], segment, position, valid[own], valid, external_local)
        nll = dense_nll(
            keys_live[own],
            keys,
            targets,
            targets[own],
            score[own],
            logz[own],
            vis,
            1 / math.sqrt(keys.shape[1]),
            valid[own],
        )
        losses.append(nll.sum())
    sum(losses).backward()
    return losses, [r.grad for r in reps]


@pytest.mark.parametrize(
    "case,rule,local_on",
    [("rep_long", "long", True), ("rep_ext_0.0", "external", True), ("rep_ext_1.0", "external", False)],
)
@pytest.mark.slow  # 2-rank distributed run
def test_two_ranks_uneven_shapes_match_dense(two_rank_results, case, rule, local_on):
    losses, grads = dense_rep_case(rule, local_on)
    for rank, results in enumerate(two_rank_results):
        got = results[case]
        torch.testing.assert_close(got["loss"].double(), losses[rank].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            got["reps_grad"].reshape(-1, got["reps_grad"].shape[-1]).double(),
            grads[rank].double(),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize(
    "case,criterion_name,rule,extra",
    [
        ("model_long", "trime_long_loss_same_device", "long", ["--allow-random-batches"]),
        ("model_ext", "trime_ext_loss", "external", ["--allow-random-batches", "--cross-sent-ratio", "0"]),
    ],
)
@pytest.mark.slow  # 2-rank distributed run
def test_two_ranks_equal_one_process_on_concatenated_batch(
    two_rank_results, dict_dir, case, criterion_name, rule, extra
):
    task, model, criterion = build(dict_dir, criterion_name, extra, task="language_modeling")
    batch = model_case_batch(task.source_dictionary)
    one_process_loss = criterion(model, batch)[0]
    rank_losses = [results[case]["loss"] for results in two_rank_results]
    torch.testing.assert_close(sum(rank_losses), one_process_loss.detach(), atol=1e-5, rtol=1e-5)
    # gradients: sum over ranks == one process with each rank's view of the other's keys as constants
    reference = dense_rank_losses(model, batch, rule, MODEL_ROWS)
    for rank_loss, dense in zip(rank_losses, reference):
        torch.testing.assert_close(rank_loss.double(), dense.detach(), atol=1e-5, rtol=1e-5)
    summed = {
        name: sum(results[case]["grads"][name] for results in two_rank_results)
        for name in two_rank_results[0][case]["grads"]
    }
    assert_grads_close(summed, param_grads(model, sum(reference)))


@pytest.mark.slow  # 2-rank distributed run
def test_two_ranks_dummy_batch_offers_no_keys(two_rank_results, dict_dir):
    ext_args = ["--allow-random-batches", "--cross-sent-ratio", "0"]
    task, model, criterion = build(dict_dir, "trime_ext_loss", ext_args, task="language_modeling")
    rank0_alone = criterion(model, slice_batch(model_case_batch(task.source_dictionary), MODEL_ROWS[0]))[0]
    torch.testing.assert_close(
        two_rank_results[0]["model_ext_dummy"]["loss"], rank0_alone.detach(), atol=1e-5, rtol=1e-5
    )
    # rank 0 heads its group under trime_long_loss: its loss never depends on rank 1
    torch.testing.assert_close(
        two_rank_results[0]["model_long_dummy"]["loss"], two_rank_results[0]["model_long"]["loss"]
    )
