"""One way per concept across the fairseq and Hugging Face front-ends.

- The external memory's coin: the fairseq criterion ``trime_ext_loss`` and
  ``trime-hf-train``'s trainer, driven through their own draw paths, draw the same
  sequence for the same (seed, rank, step, micro-batch).
- The memory names: both CLIs offer :data:`trime.memories.MEMORIES`.
- The key capture: :class:`trime.hooks.KeyCapture` on a fairseq model gives the last
  layer's ``final_layer_norm`` output as (B, T, d) with its graph, runs nothing after
  the key with ``stop=True``, and leaves no hook behind.
"""

import pytest
import torch

from tests._dist_worker import build, model_case_batch
from tests.hf_helpers import build_model
from trime.hooks import KeyCapture, fairseq_key_module
from trime.loss import Rule
from trime.memories import MEMORIES, local_off, local_off_coin

pytestmark = pytest.mark.usefixtures("one_thread")

SEED, RATIO = 5, 0.4
STEPS, MICROS = 40, 3


def fairseq_draws(dict_dir: str, seed: int) -> list[bool]:
    """local-off coins of ``trime_ext_loss`` over STEPS updates of MICROS forwards (gradient accumulation)."""
    _, _, criterion = build(
        dict_dir, "trime_ext_loss", ["--allow-random-batches", "--cross-sent-ratio", str(RATIO), "--seed", str(seed)]
    )
    draws = []
    for update in range(STEPS):
        criterion.start_update(update)
        draws += [criterion.draw_local_off() for _ in range(MICROS)]
    return draws


def hf_draws(tmp_path, seed: int) -> list[bool]:
    """local-off coins of trime-hf-train's trainer over STEPS steps of MICROS forwards."""
    from transformers import TrainingArguments

    from trime.hf.train import make_trainer_class

    args = TrainingArguments(output_dir=str(tmp_path), seed=seed, use_cpu=True, report_to=[])
    trainer = make_trainer_class()(model=build_model("gpt2"), args=args, memory="external", cross_sent_ratio=RATIO)
    draws = []
    for step in range(STEPS):
        trainer.state.global_step = step
        draws += [not trainer._external_local(True) for _ in range(MICROS)]
    return draws


@pytest.mark.parametrize("rank", [0, 1])
def test_both_trainers_draw_the_same_coins(dict_dir, tmp_path, monkeypatch, rank):
    monkeypatch.setattr("trime.criterions.trime_ext_loss.world_size_and_rank", lambda: (2, rank))
    monkeypatch.setattr("trime.distributed.world_size_and_rank", lambda: (2, rank))  # bound by make_trainer_class
    fairseq = fairseq_draws(dict_dir, SEED)
    hf = hf_draws(tmp_path, SEED)
    expected = [local_off(SEED, rank, s, m, RATIO) for s in range(STEPS) for m in range(MICROS)]
    assert fairseq == hf == expected
    assert 0.2 < sum(hf) / len(hf) < 0.6  # a real coin, not a constant
    assert hf_draws(tmp_path, SEED + 1) != hf  # the seed matters


def test_coin_is_pure_and_orders_its_inputs():
    coins = {(r, s, m): local_off_coin(SEED, r, s, m) for r in range(2) for s in range(3) for m in range(2)}
    assert len(set(coins.values())) == len(coins)  # rank, step and micro-batch each change the coin
    assert all(0.0 <= c < 1.0 for c in coins.values())
    assert local_off_coin(-3, 0, 1, 0) == local_off_coin(2**63 - 3, 0, 1, 0)  # negative seeds are taken modulo 2**63
    assert not any(local_off(SEED, 0, s, 0, 0.0) for s in range(50))
    assert all(local_off(SEED, 0, s, 0, 1.0) for s in range(50))


def test_both_clis_offer_the_memories():
    from trime.eval.evaluate import build_parser
    from trime.hf.train import build_parser as hf_parser

    def choices(parser):
        return next(a.choices for a in parser._actions if "--memory" in a.option_strings)

    assert tuple(choices(build_parser())) == tuple(choices(hf_parser())) == MEMORIES
    assert [rule.value for rule in Rule] == list(MEMORIES[1:])


def test_fairseq_capture_is_the_last_norm_output(dict_dir):
    task, model, _ = build(dict_dir, "trime_loss")
    sample = model_case_batch(task.source_dictionary)
    layer = model.decoder.layers[-1]
    store = {}
    norm_hook = layer.final_layer_norm.register_forward_hook(lambda m, i, o: store.__setitem__("norm", o))
    fc2_calls = []
    fc2_hook = layer.fc2.register_forward_pre_hook(lambda m, i: fc2_calls.append(1))
    try:
        with KeyCapture.fairseq(model) as capture:
            model(**sample["net_input"])
        keys = capture.keys(tuple(sample["target"].shape))
        assert keys.shape == (*sample["target"].shape, 16) and keys.requires_grad
        torch.testing.assert_close(keys, store["norm"].transpose(0, 1), rtol=0, atol=0)
        assert fc2_calls == [1]
        with KeyCapture.fairseq(model, stop=True) as stopped:
            model(**sample["net_input"])
        torch.testing.assert_close(stopped.keys(), keys, rtol=0, atol=0)
        assert fc2_calls == [1]  # the stopped pass ended at the key
    finally:
        norm_hook.remove()
        fc2_hook.remove()
    name, fc1 = fairseq_key_module(model)
    assert name == "decoder.layers.1.fc1" and fc1 is layer.fc1 and not fc1._forward_pre_hooks
