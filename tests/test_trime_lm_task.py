"""Task ``trime_lm``: batch layouts of ``--keep-order`` / ``--predefined-batches`` and end-to-end runs.

Batch contents are checked on the shipped WikiText-2 sample data-bin (session fixture
``wt2_sample_bin``) with simulated ``num_shards``/``shard_id``; two end-to-end
``fairseq-train`` runs (2 CPU ranks with ``trime_long_loss``, 1 process with
``trime_ext_loss`` and a plan) check that training finishes with finite losses.
"""

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from tests.tiny_lm import tiny_lm_argv
from trime.distributed import DUMMY_BATCH_KEY
from trime.errors import TrimeError

TPS = 16
BIN = Path(sys.executable).parent
FAIRSEQ_TRAIN = str(BIN / "fairseq-train")


def make_task(data, *extra, task="trime_lm", max_tokens=64):
    argv = [
        str(data),
        "--task",
        task,
        "--arch",
        "transformer_lm",
        "--tokens-per-sample",
        str(TPS),
        "--max-tokens",
        str(max_tokens),
        "--sample-break-mode",
        "none",
        *extra,
    ]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    fs_task = tasks.setup_task(cfg.task)
    fs_task.load_dataset(cfg.dataset.train_subset)
    return fs_task


def batch_iterator(task, num_shards=1, shard_id=0, split="train", max_tokens=64, multiple=8):
    return task.get_batch_iterator(
        task.dataset(split),
        max_tokens=max_tokens,
        max_positions=TPS,
        required_batch_size_multiple=multiple,
        seed=1,
        num_shards=num_shards,
        shard_id=shard_id,
        disable_iterator_cache=True,
    )


def rank_batches(task, num_shards, epoch=1, shuffle=True, **kwargs):
    """Every rank's ordered list of batches (lists of dataset indices) for one epoch."""
    out = []
    for shard in range(num_shards):
        itr = batch_iterator(task, num_shards, shard, **kwargs)
        batches = [list(map(int, b)) for b in itr.ordered_batches(epoch, False, shuffle)]
        assert len(batches) == len(itr)
        out.append(batches)
    return out


def is_run(ids):
    return list(ids) == list(range(ids[0], ids[0] + len(ids)))


# ----------------------------------------------------------------------------- --keep-order


def test_keep_order_batches_are_consecutive_and_never_shuffled(wt2_sample_bin):
    max_tokens = TPS * 10  # 10 segments: --required-batch-size-multiple 8 would make it 8
    task = make_task(wt2_sample_bin, "--keep-order", max_tokens=max_tokens)
    itr = batch_iterator(task, max_tokens=max_tokens, multiple=8)
    epochs = []
    for _ in range(2):
        epochs.append([sample["id"].tolist() for sample in itr.next_epoch_itr(shuffle=True)])
    assert epochs[0] == epochs[1]
    assert all(len(ids) == 10 for ids in epochs[0][:-1])
    assert [i for ids in epochs[0] for i in ids] == list(range(len(task.dataset("train"))))
    assert itr.first_batch[DUMMY_BATCH_KEY] is True


@pytest.mark.parametrize("num_shards,group_size", [(4, 2), (2, 1), (4, 4)])
def test_keep_order_groups_of_ranks_hold_consecutive_batches(wt2_sample_bin, num_shards, group_size):
    extra = ["--keep-order"] + (["--train-mem-size", str(64 * group_size)] if group_size > 1 else [])
    task = make_task(wt2_sample_bin, *extra)
    assert task.memory_group_size == group_size
    (all_batches,) = rank_batches(make_task(wt2_sample_bin, "--keep-order"), 1)
    per_rank = rank_batches(task, num_shards)
    assert len({len(b) for b in per_rank}) == 1  # padded with [] to the same number of steps
    num_groups = num_shards // group_size
    chunk = math.ceil(len(all_batches) / num_groups)
    for group in range(num_groups):
        members = per_rank[group * group_size : (group + 1) * group_size]
        walked = [batch for step in zip(*members) for batch in step if batch]
        assert walked == all_batches[group * chunk : (group + 1) * chunk]  # the group's contiguous chunk
        for step in zip(*members):
            ids = [i for batch in step for i in batch]
            assert not ids or is_run(ids)  # C consecutive batches at every step


def test_keep_order_validation_is_laid_out_the_same_way(wt2_sample_bin):
    task = make_task(wt2_sample_bin, "--keep-order", "--train-mem-size", "128")
    task.load_dataset("valid")
    per_rank = rank_batches(task, 2, split="valid", shuffle=False)
    for step in zip(*per_rank):
        ids = [i for batch in step for i in batch]
        assert not ids or is_run(ids)
    assert sorted(i for rank in per_rank for b in rank for i in b) == list(range(len(task.dataset("valid"))))


def test_default_layout_is_fairseqs(wt2_sample_bin):
    ours = make_task(wt2_sample_bin)
    stock = make_task(wt2_sample_bin, task="language_modeling")
    for shard in range(2):
        a = batch_iterator(ours, 2, shard).ordered_batches(2, False, True)
        b = batch_iterator(stock, 2, shard).ordered_batches(2, False, True)
        assert [list(x) for x in a] == [list(x) for x in b]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--train-mem-size", "128"], "needs --keep-order"),
        (["--keep-order", "--train-mem-size", "100"], "multiple of --max-tokens"),
        (["--keep-order", "--predefined-batches", "plan.json"], "only one of them"),
    ],
)
def test_bad_flag_combinations_are_refused(wt2_sample_bin, extra, message):
    with pytest.raises(TrimeError, match=message):
        make_task(wt2_sample_bin, *extra)


def test_world_size_not_divisible_by_group_is_refused(wt2_sample_bin):
    task = make_task(wt2_sample_bin, "--keep-order", "--train-mem-size", "128")
    with pytest.raises(TrimeError, match="does not divide the world size 3"):
        batch_iterator(task, num_shards=3)


# ----------------------------------------------------------------------------- --predefined-batches


def write_plan(path, data_dir, ids, tokens_per_sample=TPS, dataset=None):
    """A plan file in the trime-batch-plan format, written directly (no BM25 needed)."""
    from trime.retrieval.bm25_batches import dataset_identity

    meta = {
        "tokens_per_sample": tokens_per_sample,
        "num_segments": len(ids),
        "dataset": dataset if dataset is not None else dataset_identity(data_dir),
        "seed": 1,
        "backend": "test",
        "k": 0,
    }
    Path(path).write_text(
        json.dumps({"format": "trime-batch-plan", "version": 1, "ids": [int(i) for i in ids], "meta": meta})
    )
    return str(path)


@pytest.fixture(scope="module")
def plan(wt2_sample_bin, tmp_path_factory):
    num_segments = len(make_task(wt2_sample_bin).dataset("train"))
    ids = np.random.RandomState(0).permutation(num_segments)
    return write_plan(tmp_path_factory.mktemp("plan") / "plan.json", wt2_sample_bin, ids), ids


def test_predefined_batches_follow_the_plan_in_world_size_groups(wt2_sample_bin, plan):
    path, ids = plan
    task = make_task(wt2_sample_bin, "--predefined-batches", path)
    plan_chunks = [list(ids[i : i + 4]) for i in range(0, len(ids), 4)]  # 4 segments per batch
    orders, layouts = [], []
    for epoch in (1, 2):
        per_rank = rank_batches(task, 2, epoch=epoch)
        layouts.append(per_rank)
        steps = [[i for batch in step for i in batch] for step in zip(*per_rank)]
        starts = []
        for step_ids in steps:  # every step holds consecutive plan entries
            start = int(np.flatnonzero(ids == step_ids[0])[0])
            assert step_ids == list(ids[start : start + len(step_ids)])
            starts.append(start)
        assert sorted(i for s in steps for i in s) == list(range(len(ids)))
        orders.append(starts)
    assert orders[0] != orders[1]  # groups reshuffled per epoch (seed + epoch)
    assert rank_batches(task, 2, epoch=1) == layouts[0]  # deterministic given seed and epoch
    (unshuffled,) = rank_batches(task, 1, shuffle=False)
    assert unshuffled == plan_chunks


def test_predefined_batches_reach_the_dataloader(wt2_sample_bin, plan):
    path = plan[0]
    task = make_task(wt2_sample_bin, "--predefined-batches", path)
    itr = batch_iterator(task, 2, 1)
    samples = itr.next_epoch_itr(shuffle=True)
    first = [next(samples)["id"].tolist() for _ in range(3)]
    assert first == [list(b) for b in itr.ordered_batches(1, False, True)[:3]]


def test_predefined_batches_leave_validation_alone(wt2_sample_bin, plan):
    task = make_task(wt2_sample_bin, "--predefined-batches", plan[0])
    task.load_dataset("valid")
    assert batch_iterator(task, split="valid").layout is None


@pytest.mark.parametrize("what", ["tokens_per_sample", "dataset", "num_segments"])
def test_plan_mismatch_names_the_plan_file(wt2_sample_bin, plan, tmp_path, what):
    ids = plan[1]
    path = tmp_path / f"bad-{what}.json"
    if what == "tokens_per_sample":
        write_plan(path, wt2_sample_bin, ids, tokens_per_sample=TPS * 2)
    elif what == "dataset":
        write_plan(path, wt2_sample_bin, ids, dataset={"dict_sha256": "0" * 64})
    else:
        write_plan(path, wt2_sample_bin, np.arange(len(ids) - 1))
    task = make_task(wt2_sample_bin, "--predefined-batches", str(path))
    with pytest.raises(TrimeError, match=re.escape(str(path))):
        batch_iterator(task)


def test_missing_plan_file_is_refused(wt2_sample_bin, tmp_path):
    task = make_task(wt2_sample_bin, "--predefined-batches", str(tmp_path / "nope.json"))
    with pytest.raises(TrimeError, match="no such file"):
        batch_iterator(task)


# ----------------------------------------------------------------------------- fairseq-train end to end

TINY_MODEL = [
    *tiny_lm_argv(32, pre_norm=False, tokens_per_sample=TPS, max_tokens=64, lr="0.001"),
    "--share-decoder-input-output-embed", "--max-update", "4", "--log-interval", "1", "--log-format", "json",
    "--no-save", "--sample-break-mode", "none",
]  # fmt: skip


def logged_losses(output):
    """All train/valid loss values from fairseq's json log lines."""
    values = []
    for key in ("loss", "valid_loss", "train_loss"):
        values += [float(v) for v in re.findall(rf'"{key}": "?([-+0-9.eE]+|nan|inf)', output)]
    return values


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(commands, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for c in commands
    ]
    outputs = []
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    return outputs


@pytest.mark.slow  # fairseq-train runs
def test_fairseq_train_two_cpu_ranks_keep_order_long_loss(wt2_sample_bin, tmp_path):
    init = f"tcp://127.0.0.1:{free_port()}"
    commands = [
        [
            FAIRSEQ_TRAIN,
            str(wt2_sample_bin),
            "--task",
            "trime_lm",
            "--keep-order",
            "--train-mem-size",
            "128",
            "--criterion",
            "trime_long_loss",
            *TINY_MODEL,
            "--save-dir",
            str(tmp_path / "ckpt"),
            # full validation in batches of 50 segments: 23 batches on 2 ranks, so rank 1 ends on a dummy batch
            "--max-tokens-valid",
            str(50 * TPS),
            "--distributed-no-spawn",
            "--distributed-world-size",
            "2",
            "--distributed-rank",
            str(rank),
            "--distributed-init-method",
            init,
            "--distributed-backend",
            "gloo",
            "--ddp-backend",
            "no_c10d",
        ]
        for rank in range(2)
    ]
    output = run_ranks(commands)[0]
    losses = logged_losses(output)
    assert '"num_updates": "4"' in output and '"valid_loss"' in output, output[-3000:]
    assert losses and all(math.isfinite(v) for v in losses), output[-3000:]


@pytest.mark.slow  # fairseq-train runs
def test_fairseq_train_ext_loss_with_a_plan(wt2_sample_bin, plan, tmp_path):
    command = [
        FAIRSEQ_TRAIN,
        str(wt2_sample_bin),
        "--task",
        "trime_lm",
        "--predefined-batches",
        plan[0],
        "--criterion",
        "trime_ext_loss",
        "--cross-sent-ratio",
        "0.5",
        *TINY_MODEL,
        "--save-dir",
        str(tmp_path / "ckpt"),
        "--max-valid-steps",
        "2",
    ]
    output = run_ranks([command])[0]
    losses = logged_losses(output)
    assert '"num_updates": "4"' in output and '"local_off"' in output, output[-3000:]
    assert losses and all(math.isfinite(v) for v in losses), output[-3000:]
