"""Checkpoints of the original TRIME code (fairseq 0.9): read only with ``--trust-checkpoint``, and scored exactly
like the same weights saved by fairseq 0.12.

The fairseq 0.9 files are made here from the tiny TrimeLM checkpoint (:mod:`tests.eval_helpers`), in the key
layout of fairseq 0.9's ``checkpoint_utils.save_state``: ``args`` an ``argparse.Namespace``, no ``cfg``. The
args are the ones the original's training parser writes for its 247M TrimeLM_ext recipe
(``train_scripts/wiki103-247M-trime_ext.sh``), knnlm's task flags included, with the tiny model's sizes.
The weights are stored in half precision, as the original's ``--fp16`` training saves them. The fairseq
0.12 reference is the tiny checkpoint with its weights rounded through fp16, so both files hold the same
numbers. A second 0.9 file is stripped to args and weights, in torch's legacy (non-zip) format, with an
arch and a criterion setting that fairseq 0.12 cannot convert unmapped.
"""

import argparse
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.eval_helpers import BIN, CONTEXT, tiny_checkpoints
from trime.errors import TrimeError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module

# the original's training args for wiki103-247M-trime_ext (its parser's defaults and the script's flags), but
# the model sizes, which come from the tiny checkpoint (MODEL_ARGS)
ORIGINAL_TRAIN_ARGS = {
    "no_progress_bar": False, "log_interval": 1000, "log_format": None, "tensorboard_logdir": "", "seed": 1,
    "cpu": False, "fp16": True, "memory_efficient_fp16": False, "fp16_no_flatten_grads": False,
    "fp16_init_scale": 128, "fp16_scale_window": None, "fp16_scale_tolerance": 0.0, "min_loss_scale": 0.0001,
    "threshold_loss_scale": None, "user_dir": None, "empty_cache_freq": 0, "all_gather_list_size": 16384,
    "task": "language_modeling", "criterion": "trime_ext_loss", "optimizer": "nag", "lr_scheduler": "cosine",
    "tokenizer": None, "bpe": None, "num_workers": 1, "skip_invalid_size_inputs_valid_test": True,
    "max_tokens": 3072, "max_sentences": None, "required_batch_size_multiple": 8, "dataset_impl": None,
    "predefined_batches": "data-bin/wikitext-103/wiki103-l3072-batches.json", "mem_size": 0,
    "use_faiss_cpu": False, "output_segments_to_file": None, "train_subset": "train", "valid_subset": "valid",
    "validate_interval": 1, "fixed_validation_seed": None, "disable_validation": False, "max_tokens_valid": None,
    "max_sentences_valid": None, "curriculum": 0, "distributed_world_size": 4, "distributed_rank": 0,
    "distributed_backend": "nccl", "distributed_init_method": "tcp://localhost:15027", "distributed_port": -1,
    "device_id": 0, "distributed_no_spawn": False, "ddp_backend": "no_c10d", "bucket_cap_mb": 25,
    "fix_batches_to_gpus": False, "find_unused_parameters": False, "fast_stat_sync": False,
    "broadcast_buffers": False, "arch": "transformer_lm_wiki103", "max_epoch": 0, "max_update": 286000,
    "clip_norm": 0.1, "sentence_avg": False, "update_freq": [6], "lr": [0.0001], "min_lr": 1e-09,
    "use_bmuf": False, "ce_warmup_epoch": 9, "cross_sent_ratio": 0.9, "keep_order": False, "num_comb_shards": 1,
    "train_mem_size": None, "save_dir": "output/wiki103-247M-trime_ext", "restore_file": "checkpoint_last.pt",
    "reset_dataloader": False, "reset_lr_scheduler": False, "reset_meters": False, "reset_optimizer": False,
    "optimizer_overrides": "{}", "save_interval": 1, "save_interval_updates": 0, "keep_interval_updates": -1,
    "keep_last_epochs": -1, "keep_best_checkpoints": -1, "no_save": False, "no_epoch_checkpoints": False,
    "no_last_checkpoints": False, "no_save_optimizer_state": False, "best_checkpoint_metric": "loss",
    "maximize_best_checkpoint_metric": False, "patience": -1, "dist": "l2", "temp": 1.0,
    "data": "data-bin/wikitext-103", "sample_break_mode": "none", "output_dictionary_size": -1,
    "self_target": False, "future_target": False, "past_target": False, "add_bos_token": False,
    "max_target_positions": None, "truncate_sequence": False, "knn_keytype": "last_ffn_input", "probe": 8,
    "k": 1024, "dstore_size": 103227021, "dstore_filename": None, "indexfile": None, "lmbda": 0.0,
    "knn_sim_func": None, "faiss_metric_type": "l2", "no_load_keys": False, "dstore_fp16": False,
    "move_dstore_to_mem": False, "momentum": 0.99, "weight_decay": 0.0, "warmup_updates": 16000,
    "warmup_init_lr": 1e-07, "max_lr": 1.0, "t_mult": 2.0, "lr_period_updates": 270000.0, "lr_shrink": 0.75,
}  # fmt: skip
# the model args of the original's transformer_lm (fairseq 0.9 names), valued from the tiny checkpoint's cfg
MODEL_ARGS = (
    "activation_fn", "dropout", "attention_dropout", "activation_dropout", "decoder_embed_dim", "decoder_output_dim",
    "decoder_input_dim", "decoder_ffn_embed_dim", "decoder_layers", "decoder_attention_heads",
    "decoder_normalize_before", "no_decoder_final_norm", "adaptive_softmax_cutoff", "adaptive_softmax_dropout",
    "adaptive_softmax_factor", "no_token_positional_embeddings", "share_decoder_input_output_embed",
    "character_embeddings", "character_filters", "character_embedding_dim", "char_embedder_highway_layers",
    "adaptive_input", "adaptive_input_factor", "adaptive_input_cutoff", "tie_adaptive_weights", "tie_adaptive_proj",
    "decoder_learned_pos", "decoder_layerdrop", "decoder_layers_to_keep", "layernorm_embedding", "no_scale_embedding",
)  # fmt: skip
EVAL = ["--gen-subset", "valid", "--context-window", str(CONTEXT), "--memory", "long", "--mem-size", "96",
        "--softmax-temp", "1.25", "--cpu", "--no-progress-bar"]  # fmt: skip
STORE = ["--gen-subset", "valid", "--context-window", str(CONTEXT), "--batch-size", "16", "--key-dtype", "fp32",
         "--no-index", "--cpu", "--no-progress-bar"]  # fmt: skip


def original_args(cfg: dict, **changes) -> argparse.Namespace:
    """The Namespace the original's training parser writes, with the tiny model's sizes and ``changes``."""
    model = cfg["model"]
    values = {**ORIGINAL_TRAIN_ARGS, **{name: model[name] for name in MODEL_ARGS},
              "tokens_per_sample": cfg["task"]["tokens_per_sample"]}
    values.update(changes)
    return argparse.Namespace(**values)


@pytest.fixture(scope="module")
def files(tmp_path_factory, wt2_sample_bin) -> dict:
    """{"fairseq-0.12": the reference, "fairseq-0.9": the full 0.9 layout, "stripped": args and weights only,
    "garbage": bytes that are no checkpoint}."""
    source = tiny_checkpoints(tmp_path_factory, wt2_sample_bin)["trime"]
    state = torch.load(source, map_location="cpu", weights_only=False)
    out = tmp_path_factory.mktemp("old_checkpoints")
    half = {name: t.half() if t.is_floating_point() else t for name, t in state["model"].items()}
    rounded = {name: t.float() if t.is_floating_point() else t for name, t in half.items()}
    assert any(not torch.equal(rounded[name], t) for name, t in state["model"].items())  # fp16 rounds these weights

    reference = out / "checkpoint_012.pt"
    torch.save({**state, "model": rounded}, reference)

    original = out / "checkpoint_09.pt"  # fairseq 0.9's save_state layout
    torch.save({
        "args": original_args(state["cfg"]),
        "model": {**half, "decoder.embed_positions._float_tensor": torch.zeros(1, dtype=torch.half)},  # a 0.9 buffer
        "optimizer_history": [{"criterion_name": "TrimeExtLoss", "optimizer_name": "FP16Optimizer",
                               "lr_scheduler_state": {"best": 4.096}, "num_updates": 8}],
        "extra_state": {"train_iterator": {"epoch": 2, "iterations_in_epoch": 0, "shuffle": True},
                        "val_loss": 4.096, "best": 4.096, "metrics": {}},
        "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4, "momentum": 0.99, "weight_decay": 0.0,
                                                                "params": []}], "loss_scale": 8.0},
    }, original)  # fmt: skip

    stripped = out / "checkpoint_09_stripped.pt"  # legacy format; an arch fairseq 0.12 lacks, None for a float
    args = original_args(state["cfg"], arch="transformer_lm_wiki103_small_sm", cross_sent_ratio=None)
    torch.save({"args": args, "model": rounded}, stripped, _use_new_zipfile_serialization=False)

    garbage = out / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    return {"fairseq-0.12": reference, "fairseq-0.9": original, "stripped": stripped, "garbage": garbage}


def eval_row(data: Path, ckpt: Path, *extra: str) -> dict:
    from trime.eval.evaluate import run

    return run([str(data), "--path", str(ckpt), *EVAL, *extra])["results"][-1]


def cli(*argv) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(BIN / argv[0]), *map(str, argv[1:])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def one_error_line(proc: subprocess.Popen) -> str:
    """The only stderr line of a command that failed."""
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("trime: error: "), err[-3000:]
    return lines[0]


def assert_refused(message: str, ckpt: Path) -> None:
    assert f"--path {ckpt} is a pickle that can run code" in message and "argparse.Namespace" in message
    assert "pass --trust-checkpoint if you trust the file's source" in message and "\n" not in message


def test_without_trust_both_tools_refuse_in_one_line_naming_the_flag(files, wt2_sample_bin, tmp_path):
    from trime.retrieval.build_datastore import main

    ckpt = files["fairseq-0.9"]
    with pytest.raises(TrimeError) as err:
        eval_row(wt2_sample_bin, ckpt)
    assert_refused(str(err.value), ckpt)
    with pytest.raises(TrimeError) as err:
        main([str(wt2_sample_bin), "--path", str(ckpt), "--output", str(tmp_path / "ds"), *STORE])
    assert_refused(str(err.value), ckpt)
    assert not (tmp_path / "ds" / "keys.npy").exists()


@pytest.mark.slow  # two CLI subprocesses (torch and fairseq start-up)
def test_without_trust_the_clis_exit_1_with_one_stderr_line(files, wt2_sample_bin, tmp_path):
    """The commands themselves, run together: exit status 1, the one line on stderr and nothing else."""
    ckpt = files["fairseq-0.9"]
    runs = [cli("trime-eval", wt2_sample_bin, "--path", ckpt, *EVAL),
            cli("trime-build-datastore", wt2_sample_bin, "--path", ckpt, "--output", tmp_path / "ds", *STORE)]
    for proc in runs:
        assert_refused(one_error_line(proc), ckpt)
        assert proc.returncode == 1
    assert not (tmp_path / "ds" / "keys.npy").exists()


@pytest.mark.parametrize("name", ["fairseq-0.9", "stripped"])
def test_trusted_original_checkpoint_scores_like_fairseq_012(files, wt2_sample_bin, name):
    reference = eval_row(wt2_sample_bin, files["fairseq-0.12"])
    row = eval_row(wt2_sample_bin, files[name], "--trust-checkpoint")
    assert row["tokens"] == reference["tokens"] == 18345
    assert row["ppl"] == pytest.approx(reference["ppl"], rel=1e-6)
    assert row["loss_base2"] == pytest.approx(reference["loss_base2"], rel=1e-6)


def test_stripped_legacy_file_is_refused_without_trust(files, wt2_sample_bin):
    """A legacy-format pickle: torch lists no globals for it, its weights-only error names the Namespace."""
    with pytest.raises(TrimeError) as err:
        eval_row(wt2_sample_bin, files["stripped"])
    assert_refused(str(err.value), files["stripped"])


def test_trusted_original_checkpoint_gives_the_same_datastore_keys(files, wt2_sample_bin, tmp_path):
    from trime.retrieval.build_datastore import main

    main([str(wt2_sample_bin), "--path", str(files["fairseq-0.12"]), "--output", str(tmp_path / "ref"), *STORE])
    main([str(wt2_sample_bin), "--path", str(files["fairseq-0.9"]), "--output", str(tmp_path / "old"), *STORE,
          "--trust-checkpoint"])
    ref_keys, old_keys = (np.load(tmp_path / d / "keys.npy") for d in ("ref", "old"))
    assert ref_keys.shape == (18345, 32) and np.array_equal(ref_keys, old_keys)
    assert np.array_equal(np.load(tmp_path / "ref" / "vals.npy"), np.load(tmp_path / "old" / "vals.npy"))


@pytest.mark.parametrize("trust", [[], ["--trust-checkpoint"]], ids=["untrusted", "trusted"])
def test_garbage_is_still_one_unreadable_line(files, wt2_sample_bin, trust):
    with pytest.raises(TrimeError) as err:
        eval_row(wt2_sample_bin, files["garbage"], *trust)
    message = str(err.value)
    assert "\n" not in message
    assert f"--path {files['garbage']} could not be read as a fairseq checkpoint (UnpicklingError: " in message
    assert "re-download or re-train it" in message and "--trust-checkpoint" not in message


def test_other_key_types_and_unknown_archs_are_refused_in_one_line(files, tmp_path):
    """Rules after the mapping: keys other than the last FFN's input, an arch nobody registers."""
    from trime.adapters.fairseq_lm import read_checkpoint

    state = torch.load(files["fairseq-0.9"], map_location="cpu", weights_only=False)
    for change, needle in [({"knn_keytype": "model_output"}, "--knn-keytype model_output"),
                           ({"arch": "transformer_lm_nosuch"}, "'transformer_lm_nosuch'")]:
        path = tmp_path / "changed.pt"
        torch.save({**state, "args": argparse.Namespace(**{**vars(state["args"]), **change})}, path)
        with pytest.raises(TrimeError) as err:
            read_checkpoint(path, trust=True)
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_trusted_conversion_keeps_fairseq_012_defaults_and_our_data(files, wt2_sample_bin):
    """What fairseq 0.9 lacks converts to 0.12's defaults (not to True from an interpolation string); the model
    loads on the data-bin given, not on the original's path in the args."""
    from trime.adapters import load_adapter

    lm = load_adapter(files["fairseq-0.9"], wt2_sample_bin, cpu=True, trust_checkpoint=True)
    assert lm.cfg.task.data == str(wt2_sample_bin) and lm.cfg.task._name == "language_modeling"
    assert not lm.cfg.task.tpu and not lm.cfg.task.use_plasma_view and not lm.cfg.model.tpu
    assert lm.cfg.model.decoder_layers == 2 and lm.cfg.criterion._name == "trime_ext_loss" and lm.dim == 32


def test_a_torch_that_unpickles_everything_by_default_refuses_and_maps_the_same(files, wt2_sample_bin, monkeypatch):
    """torch < 2.6 (setup.py allows >= 2.1): torch.load without weights_only unpickles everything. Simulated: the
    same refusal without trust, the same mapped conversion with it (fairseq's loader alone would convert the
    unmapped args, with task.use_plasma_view True)."""
    import trime.adapters.fairseq_lm as fairseq_lm
    from trime.adapters import load_adapter

    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, weights_only=None, **k: real_load(
        *a, weights_only=False if weights_only is None else weights_only, **k))
    monkeypatch.setattr(fairseq_lm, "WEIGHTS_ONLY_BY_DEFAULT", False)
    with pytest.raises(TrimeError) as err:
        load_adapter(files["fairseq-0.9"], wt2_sample_bin, cpu=True)
    assert_refused(str(err.value), files["fairseq-0.9"])
    lm = load_adapter(files["fairseq-0.9"], wt2_sample_bin, cpu=True, trust_checkpoint=True)
    assert not lm.cfg.task.use_plasma_view and lm.cfg.task.data == str(wt2_sample_bin)
    assert load_adapter(files["fairseq-0.12"], wt2_sample_bin, cpu=True).cfg.model.decoder_layers == 2


def test_hf_models_refuse_the_flag(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from trime.adapters import load_adapter

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(model_dir)
    with pytest.raises(TrimeError) as err:
        load_adapter(model_dir, tmp_path, cpu=True, trust_checkpoint=True)
    assert "--trust-checkpoint is for fairseq checkpoints" in str(err.value)


def test_the_flag_is_shared_by_every_model_tool():
    """trime-eval, trime-build-datastore and trime-generate get it from add_model_args: one flag, one help."""
    import importlib

    helps = set()
    tools = {"trime.eval.evaluate": [], "trime.retrieval.build_datastore": ["--output", "ds"], "trime.eval.generate": ["--prompt", "The"]}
    for module, required in tools.items():
        parser = importlib.import_module(module).build_parser()
        helps |= {a.help for a in parser._actions if "--trust-checkpoint" in a.option_strings}
        assert parser.parse_args(["data", "--path", "x.pt", "--trust-checkpoint", *required]).trust_checkpoint
        assert not parser.parse_args(["data", "--path", "x.pt", *required]).trust_checkpoint
    assert len(helps) == 1
