"""``trime-hf-train`` and ``trime-bm25-batches --model``: training, batch layouts, resume, distributed, bad input.

Tiny random GPT-2 models with the tokenizer trained in ``hf_helpers``; a few steps each.
The training runs call ``main`` in-process (the CLI's one-line errors are checked in a
subprocess once). The distributed tests run two gloo processes: ``causal_lm_loss`` by
``tests/_hf_dist_worker.py`` against one process on the concatenated batch, and the trainer
itself under ``torchrun``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._hf_dist_worker import CASES, RANK_ROWS, global_batch
from tests.hf_helpers import (
    SAMPLE_TRAIN,
    SAMPLE_VALID,
    assert_grads_close,
    build_model,
    dense_trime_nll,
    hf_train_argv,
    load_test_tokenizer,
    model_dir,
    param_grads,
    text_head,
    tokenizer_dir,
)
from trime.errors import TrimeError
from trime.hf.data import BlockDataset, text_blocks, train_order
from trime.hf.train import main as train_main
from trime.memories import local_off
from trime.retrieval.bm25_batches import main as bm25_main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent  # workers run as `python -m tests.NAME` from here
PYTHON = sys.executable
BLOCK = 32
BATCH = 4


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """(train, valid): the first ~24 KB / 5 KB of the shipped WikiText-2 sample."""
    root = tmp_path_factory.mktemp("hf_text")
    return text_head(SAMPLE_TRAIN, root / "train.txt", 24_000), text_head(SAMPLE_VALID, root / "valid.txt", 5_000)


@pytest.fixture(scope="module")
def plan(texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_plan") / "plan.json"
    bm25_main([str(texts[0]), "--model", str(model_dir("gpt2")), "--tokens-per-sample", str(BLOCK),
               "--output", str(path), "--no-progress-bar"])
    return path


def train_argv(texts, out, memory, *extra, steps=3):
    return hf_train_argv(model_dir("gpt2"), texts[0], out, memory, *extra, block=BLOCK, batch=BATCH, steps=steps)


def log_history(checkpoint: Path) -> list:
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("memory", ["local", "long", "external"])
def test_train_writes_a_standard_model_dir(texts, plan, tmp_path, memory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / memory
    extra = ["--bm25-plan", str(plan)] if memory == "external" else []
    train_main(train_argv(texts, out, memory, "--validation-file", str(texts[1]), *extra))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and len(tokenizer) == len(load_test_tokenizer())
    record = json.loads((out / "trime_hf_train.json").read_text())
    assert record["memory"] == memory and record["global_step"] == 3 and record["block_size"] == BLOCK
    logs = [entry for entry in log_history(out / "checkpoint-3") if "loss" in entry]
    assert len(logs) == 3 and all(np.isfinite(e["loss"]) and "ori_loss" in e and "norm_loss" in e for e in logs)
    assert logs[0]["norm_loss"] < logs[0]["ori_loss"]  # first step, at random init: the memory helps (repeats)
    assert ("local_off" in logs[0]) == (memory == "external")
    evaluation = record["eval"]
    assert np.isfinite(evaluation["eval_loss"]) and evaluation["eval_loss"] == pytest.approx(evaluation["eval_norm_loss"])
    assert "eval_ori_loss" in evaluation and "eval_ppl" in evaluation


def test_ce_warmup_optimises_cross_entropy_first(texts, tmp_path):
    train_main(train_argv(texts, tmp_path / "w", "long", "--ce-warmup-steps", "2"))
    logs = [entry for entry in log_history(tmp_path / "w" / "checkpoint-3") if "loss" in entry]
    assert [("norm_loss" in e) for e in logs] == [False, False, True]
    assert logs[0]["loss"] == pytest.approx(logs[0]["ori_loss"], rel=1e-6)


def test_ordered_layouts_hand_consecutive_batches_to_consecutive_ranks(texts, plan):
    """long: file order; external: plan order; accelerate's sharding gives rank r batch s*W+r at step s."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    blocks = text_blocks(str(texts[0]), load_test_tokenizer(), BLOCK)
    plan_ids = np.asarray(json.loads(Path(plan).read_text())["ids"])
    assert train_order("local", len(blocks), None, BATCH, 2) is None
    for memory, expected in (("long", np.arange(len(blocks))), ("external", plan_ids)):
        order = train_order(memory, len(blocks), plan_ids, BATCH, 2)
        assert len(order) % (2 * BATCH) == 0 and len(order) > len(blocks) - 2 * BATCH
        dataset = BlockDataset(blocks, order)
        per_rank = []
        for rank in range(2):
            base = BatchSampler(SequentialSampler(dataset), BATCH, drop_last=False)
            per_rank.append(list(BatchSamplerShard(base, num_processes=2, process_index=rank)))
        steps = [[dataset.block_index(i) for batch in step for i in batch] for step in zip(*per_rank)]
        assert [i for step in steps for i in step] == list(expected[: len(order)])
        assert torch.equal(dataset[5]["input_ids"], torch.from_numpy(np.asarray(blocks[expected[5]], dtype=np.int64)))


def test_external_coin_is_a_pure_function_of_seed_step_and_rank():
    draws = [local_off(1, 0, step, 0, 0.5) for step in range(200)]
    assert draws == [local_off(1, 0, step, 0, 0.5) for step in range(200)]
    assert 60 < sum(draws) < 140 and draws != [local_off(1, 1, step, 0, 0.5) for step in range(200)]
    assert not any(local_off(1, 0, s, 0, 0.0) for s in range(50))
    assert all(local_off(1, 0, s, 0, 1.0) for s in range(50))


@pytest.mark.parametrize("memory", ["local", "external"])
def test_resumed_training_continues_exactly(texts, plan, tmp_path, memory):
    """Stopped after 2 of 4 steps and resumed == 4 uninterrupted steps (same losses, same weights)."""
    from safetensors.torch import load_file

    extra = ["--lr-scheduler-type", "constant", "--save-steps", "2"]
    if memory == "external":
        extra += ["--bm25-plan", str(plan), "--cross-sent-ratio", "0.5"]
    train_main(train_argv(texts, tmp_path / "whole", memory, *extra, steps=4))
    train_main(train_argv(texts, tmp_path / "split", memory, *extra, steps=2))
    train_main(train_argv(texts, tmp_path / "split", memory, *extra, "--resume-from-checkpoint", steps=4))
    whole, split = log_history(tmp_path / "whole" / "checkpoint-4"), log_history(tmp_path / "split" / "checkpoint-4")
    steps = lambda logs: {e["step"]: e for e in logs if "loss" in e}  # noqa: E731
    for step in (3, 4):
        resumed, uninterrupted = steps(split)[step], steps(whole)[step]
        assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-5)
        assert resumed.get("local_off") == uninterrupted.get("local_off")  # the same coins (external)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- every TrainingArguments flag


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def step_logs(checkpoint: Path) -> dict:
    return {e["step"]: e for e in log_history(checkpoint) if "loss" in e}


def test_gradient_checkpointing_keeps_the_keys_gradients():
    """Checkpointed layers recompute their activations in backward: the TRIME loss and every gradient are the same."""
    from trime.hf import causal_lm_loss

    ids = torch.randint(5, 60, (3, 16), generator=torch.Generator().manual_seed(2))
    results = []
    for checkpointing in (False, True):
        model = build_model("llama", seed=4, dtype=torch.float64)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        out = causal_lm_loss(model, ids, "long")
        results.append((out.loss_sum.detach(), param_grads(model, out.loss_sum)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_gradient_checkpointing_flag_trains_the_same_steps(texts, tmp_path):
    """--gradient-checkpointing (HF's flag, no value) reaches the Trainer and changes no loss and no weight."""
    train_main(train_argv(texts, tmp_path / "plain", "local", "--save-steps", "2", steps=2))
    train_main(train_argv(texts, tmp_path / "gc", "local", "--save-steps", "2", "--gradient-checkpointing", steps=2))
    args = torch.load(tmp_path / "gc" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.activation_checkpointing is True
    plain, gc = step_logs(tmp_path / "plain" / "checkpoint-2"), step_logs(tmp_path / "gc" / "checkpoint-2")
    for step in (1, 2):
        assert gc[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-6)
        assert gc[step]["grad_norm"] == pytest.approx(plain[step]["grad_norm"], rel=1e-5)
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "gc")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_eval_strategy_steps_evaluates_every_step_without_changing_training(texts, tmp_path):
    valid = ["--validation-file", str(texts[1])]
    train_main(train_argv(texts, tmp_path / "once", "local", *valid))
    train_main(train_argv(texts, tmp_path / "every", "local", *valid, "--eval-strategy", "steps", "--eval-steps", "1"))
    once, every = log_history(tmp_path / "once" / "checkpoint-3"), log_history(tmp_path / "every" / "checkpoint-3")
    assert [e["step"] for e in every if "eval_loss" in e] == [1, 2, 3]
    assert not [e for e in once if "eval_loss" in e]  # the default: one evaluation after training, in the record
    for e in every:
        if "eval_loss" in e:
            assert "eval_ori_loss" in e and e["eval_loss"] == pytest.approx(e["eval_norm_loss"], rel=1e-6)
    for step in (1, 2, 3):
        assert step_logs(tmp_path / "every" / "checkpoint-3")[step]["loss"] == step_logs(
            tmp_path / "once" / "checkpoint-3")[step]["loss"]
    final = {e["step"]: e for e in every if "eval_loss" in e}[3]["eval_loss"]
    assert json.loads((tmp_path / "once" / "trime_hf_train.json").read_text())["eval"]["eval_loss"] == pytest.approx(
        final, rel=1e-6)


def test_training_arguments_parse_with_trime_defaults_and_hf_spellings():
    from trime.hf.train_args import parse, training_arguments

    base = ["--model", "m", "--train-file", "t", "--output-dir", "o"]
    args, hf = parse(base)
    assert (hf["seed"], hf["logging_steps"], hf["num_train_epochs"], hf["optim"], hf["report_to"]) == (
        1, 10, 1.0, "adamw_torch", "none")
    assert hf["per_device_eval_batch_size"] == hf["per_device_train_batch_size"] == 8 and hf["eval_strategy"] == "no"
    assert args.memory == "local" and args.lora_r is None
    kwargs = '{"min_lr": 1e-05}'
    args, hf = parse(base + ["--lr_scheduler_type", "cosine_with_min_lr", "--lr-scheduler-kwargs", kwargs, "--cpu",
                             "--no-progress-bar", "--per_device_train_batch_size", "2", "--eval-steps", "5",
                             "--validation-file", "v", "--lora-r", "4"])
    training_args = training_arguments(hf)
    assert training_args.lr_scheduler_kwargs == {"min_lr": 1e-05} and training_args.use_cpu
    assert training_args.disable_tqdm and training_args.per_device_eval_batch_size == 2
    assert str(training_args.lr_scheduler_type.value) == "cosine_with_min_lr"
    assert training_args.eval_strategy.value == "steps" and training_args.eval_steps == 5
    assert args.lora_alpha == 8.0  # 2 x --lora-r


def test_help_lists_every_training_arguments_flag(capsys):
    import dataclasses

    from transformers import TrainingArguments

    from trime.hf.train import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for field in dataclasses.fields(TrainingArguments):
        if field.init:
            assert f"--{field.name.replace('_', '-')}" in out, field.name
    for name in ("--gradient-checkpointing", "--torch-compile", "--eval-strategy", "--lr-scheduler-kwargs",
                 "--deepspeed", "--fsdp", "--lora-r", "--lora-target-modules", "--memory", "--cpu"):
        assert name in out


@pytest.mark.parametrize("extra,expected", [
    (["--lr-scheduler-kwargs", "{min_lr: 1}"], "argument --lr-scheduler-kwargs: not valid JSON"),
    (["--eval-steps", "nan"], "argument --eval-steps: must be a finite number > 0, got nan"),
    (["--gradient-checkpointing", "maybe"], "argument --gradient-checkpointing: Truthy value expected"),
    (["--eval-strategy", "sometimes"], "argument --eval-strategy: invalid choice: 'sometimes'"),
])
def test_bad_training_arguments_values_are_one_usage_line(texts, tmp_path, capsys, extra, expected):
    with pytest.raises(SystemExit) as exit_:
        train_main(train_argv(texts, tmp_path / "o", "local", *extra))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith(f"trime: error: {expected}")
    assert err.rstrip().endswith("(see trime-hf-train --help)")


@pytest.mark.parametrize("extra,expected", [
    (["--eval-strategy", "steps"], "--eval-strategy steps evaluates --validation-file"),
    (["--train-sampling-strategy", "group_by_length"], "every block has --block-size tokens"),
    (["--label-smoothing-factor", "0.1"], "the TRIME loss has no label smoothing"),
    (["--auto-find-batch-size"], "--auto-find-batch-size: the memories' batch layout"),
    (["--lora-alpha", "16"], "--lora-alpha configures LoRA: pass --lora-r R too"),
    (["--deepspeed", "ds.json"], "transformers refuses these flags: "),  # deepspeed is not installed here
    (["--fsdp", "full_shard"], "transformers refuses these flags: Using fsdp only works in distributed training"),
])
def test_flags_trime_cannot_honour_here_are_one_line(texts, tmp_path, extra, expected):
    assert expected in _error(train_argv(texts, tmp_path / "o", "local", *extra))
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(commands, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=REPO)
             for cmd in commands]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("distributed processes timed out")
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} failed:\n{outputs[i][-3000:]}"
    return outputs


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_dist")
    init = f"tcp://127.0.0.1:{free_port()}"
    _run_ranks([[PYTHON, "-m", "tests._hf_dist_worker", str(r), "2", init, str(out / f"r{r}.pt")] for r in range(2)])
    return [torch.load(out / f"r{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow  # 2-rank or CLI subprocess runs
@pytest.mark.parametrize("memory,external_local", CASES)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_rank_results, memory, external_local):
    from trime.hf import causal_lm_loss

    model = build_model("gpt2", seed=3, dtype=torch.float64)
    ids, mask = global_batch()
    one = causal_lm_loss(model, ids, memory, attention_mask=mask, external_local=external_local)
    ranks = [results[(memory, external_local)] for results in two_rank_results]
    assert sum(r["num_tokens"] for r in ranks) == one.num_tokens
    torch.testing.assert_close(sum(r["loss_sum"] for r in ranks), one.loss_sum.detach(), rtol=1e-6, atol=1e-6)
    # gradients: sum over ranks == one process where each rank's queries see the other rank's keys as constants
    reference = 0
    for rank, rows in enumerate(RANK_ROWS):
        own = torch.zeros(len(ids), dtype=torch.bool)
        own[list(rows)] = True
        nll_sum, _ = dense_trime_nll(model, "gpt2", ids, memory, mask, external_local=external_local,
                                     key_rows_detached=~own, query_rows=own)
        torch.testing.assert_close(ranks[rank]["loss_sum"].double(), nll_sum.detach(), rtol=1e-6, atol=1e-6)
        reference = reference + nll_sum
    summed = {name: sum(r["grads"][name] for r in ranks) for name in ranks[0]["grads"]}
    assert_grads_close(summed, param_grads(model, reference))


@pytest.mark.slow  # 2-rank or CLI subprocess runs
def test_torchrun_two_processes_train_long_memory(texts, tmp_path):
    """DDP through torchrun (gloo): rank r holds batch 2s+r; the first loss equals one process on both batches."""
    argv = train_argv(texts, tmp_path / "ddp", "long", "--per-device-train-batch-size", "2", steps=2)
    port = free_port()
    _run_ranks([[PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                 "-m", "trime.hf.train", *argv]])
    train_main(train_argv(texts, tmp_path / "one", "long", "--per-device-train-batch-size", "4", steps=1))
    ddp = [e for e in log_history(tmp_path / "ddp" / "checkpoint-2") if "loss" in e]
    one = [e for e in log_history(tmp_path / "one" / "checkpoint-1") if "loss" in e]
    record = json.loads((tmp_path / "ddp" / "trime_hf_train.json").read_text())
    assert record["world_size"] == 2 and record["global_step"] == 2
    assert ddp[0]["norm_loss"] == pytest.approx(one[0]["norm_loss"], rel=1e-4)
    assert ddp[0]["ori_loss"] == pytest.approx(one[0]["ori_loss"], rel=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory):
    """A model dir without tokenizer, an unsupported (Mamba) model dir, another tokenizer's model dir."""
    from transformers import AutoModelForCausalLM, MambaConfig

    root = tmp_path_factory.mktemp("hf_bad")
    build_model("gpt2").save_pretrained(root / "no-tokenizer")
    mamba = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1))
    mamba.save_pretrained(root / "mamba")
    load_test_tokenizer().save_pretrained(root / "mamba")
    build_model("gpt2").save_pretrained(root / "other-tokenizer")
    load_test_tokenizer(300).save_pretrained(root / "other-tokenizer")
    return root


def _error(argv) -> str:
    with pytest.raises(TrimeError) as err:
        train_main(argv)
    message = str(err.value)
    assert "\n" not in message and message.startswith("trime: error: ")
    return message


@pytest.mark.slow  # 2-rank or CLI subprocess runs
def test_model_dir_without_tokenizer_is_one_line(texts, bad_dirs, tmp_path):
    argv = train_argv(texts, tmp_path / "o", "local")
    argv[1] = str(bad_dirs / "no-tokenizer")
    assert "has no tokenizer" in _error(argv) and "tokenizer.save_pretrained" in _error(argv)
    proc = subprocess.run([PYTHON, "-m", "trime.hf.train", *argv], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "trime: error:" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_is_one_line(texts, bad_dirs, tmp_path):
    argv = train_argv(texts, tmp_path / "o", "local")
    argv[1] = str(bad_dirs / "mamba")
    message = _error(argv)
    assert "unsupported architecture MambaForCausalLM" in message and "--key-module" in message


def test_text_too_short_for_one_block_is_one_line(texts, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(" = Valkyria = \n")
    argv = train_argv(texts, tmp_path / "o", "local")
    argv[argv.index("--train-file") + 1] = str(short)
    assert "fewer than one block of --block-size 32" in _error(argv)
    argv[argv.index("--train-file") + 1] = str(tmp_path / "missing.txt")
    assert "--train-file" in _error(argv) and "no such file" in _error(argv)


def test_plan_for_another_tokenizer_is_one_line(texts, plan, bad_dirs, tmp_path):
    argv = train_argv(texts, tmp_path / "o", "external", "--bm25-plan", str(plan))
    argv[1] = str(bad_dirs / "other-tokenizer")
    message = _error(argv)
    assert f"batch plan {plan} was built for another tokenizer" in message and "trime-bm25-batches" in message


def test_plan_for_other_text_and_missing_plan_are_one_line(texts, plan, tmp_path):
    other = text_head(SAMPLE_TRAIN, tmp_path / "other.txt", 20_000)
    argv = train_argv((other, texts[1]), tmp_path / "o", "external", "--bm25-plan", str(plan))
    message = _error(argv)
    assert f"batch plan {plan} was built from different data than {other}" in message
    assert "--bm25-plan PLAN" in _error(train_argv(texts, tmp_path / "o", "external"))


def test_non_empty_output_dir_is_not_overwritten(texts, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "is not empty" in _error(train_argv(texts, out, "local"))
    assert "no checkpoint" in _error(train_argv(texts, out, "local", "--resume-from-checkpoint"))
    assert (out / "keep.txt").read_text() == "x"


def test_bm25_plan_over_text_records_the_tokenizer(texts, plan):
    from trime.hf.text import tokenizer_identity

    meta = json.loads(Path(plan).read_text())["meta"]
    assert meta["kind"] == "hf-text" and meta["tokens_per_sample"] == BLOCK
    assert meta["tokenizer"] == tokenizer_identity(load_test_tokenizer())
    assert meta["num_segments"] == len(text_blocks(str(texts[0]), load_test_tokenizer(), BLOCK))
    assert tokenizer_dir().is_dir()
