"""One rank of the 2-process (gloo, CPU) tests of ``trime_long_loss`` / ``trime_ext_loss``.

Run by ``tests/test_long_ext.py`` from the repository root as
``python -m tests._dist_worker RANK WORLD INIT_METHOD DICT_DIR OUT``.
Each rank computes its share of the cases below on its slice of a deterministic global
batch and saves losses and gradients to OUT (``torch.save``); the test compares them
with one process on the concatenated batch. The data builders are imported by the
test as well, so both sides see identical inputs.
"""

import sys
import types
from collections.abc import Sequence

import torch

from tests.tiny_lm import tiny_lm_argv

# (batch, seq_len) per rank for the representation-level cases: uneven on purpose
REP_SHAPES: list[tuple[int, int]] = [(2, 5), (3, 4)]
REP_DIM, REP_VOCAB = 8, 5
# model-level cases: rows of the concatenated batch held by each rank (uneven)
MODEL_ROWS: list[Sequence[int]] = [range(2), range(2, 5)]
MODEL_SEQ_LEN = 6
NUM_WORDS = 30


def rep_case_data(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per rank: reps (B, T, d), targets and valid (B, T), token terms (B*T,); padding inside the stream."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rank, (batch, seq_len) in enumerate(REP_SHAPES):
        valid = torch.ones(batch, seq_len, dtype=torch.bool)
        valid[-1, -2 + rank :] = False  # rank 0: 2 pads, rank 1: 1 pad at the end of its last row
        out.append(
            {
                "reps": torch.randn(batch, seq_len, REP_DIM, generator=g),
                "targets": torch.randint(0, REP_VOCAB, (batch, seq_len), generator=g),
                "valid": valid,
                "token_score": torch.randn(batch * seq_len, generator=g),
                "token_logz": torch.randn(batch * seq_len, generator=g).abs() + 2.0,
            }
        )
    return out


def build(dict_dir: str, criterion: str, extra: Sequence[str] = (), task: str = "trime_lm"):
    """(task, model, criterion) for a tiny pre-norm transformer LM over the words in ``dict_dir``."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [dict_dir, "--task", task, *tiny_lm_argv(16, dropout=0, tokens_per_sample=MODEL_SEQ_LEN),
            "--criterion", criterion, *extra]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    fs_task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = fs_task.build_model(cfg.model)
    return fs_task, model, fs_task.build_criterion(cfg.criterion)


def model_case_batch(dictionary, seed: int = 1) -> dict:
    """The concatenated batch (5 rows): right padding in row 1 (end of rank 0) and row 4."""
    g = torch.Generator().manual_seed(seed)
    lo = dictionary.nspecial
    tokens = torch.randint(lo, lo + 8, (5, MODEL_SEQ_LEN + 1), generator=g)  # few types: many positives
    src, tgt = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    for row, pads in ((1, 2), (4, 3)):
        src[row, -pads:] = dictionary.pad()
        tgt[row, -pads:] = dictionary.pad()
    return {
        "id": torch.arange(5),
        "net_input": {"src_tokens": src, "src_lengths": src.ne(dictionary.pad()).sum(1)},
        "target": tgt,
        "ntokens": int(tgt.ne(dictionary.pad()).sum()),
        "nsentences": 5,
    }


def slice_batch(batch: dict, rows: Sequence[int]) -> dict:
    rows = torch.as_tensor(list(rows))
    src, tgt = batch["net_input"]["src_tokens"][rows], batch["target"][rows]
    return {
        "id": batch["id"][rows],
        "net_input": {"src_tokens": src, "src_lengths": batch["net_input"]["src_lengths"][rows]},
        "target": tgt,
        "ntokens": int(tgt.ne(1).sum()),
        "nsentences": len(rows),
    }


def _rep_case(criterion, data: dict) -> dict:
    from trime.loss import joint_nll

    reps = data["reps"].clone().requires_grad_(True)
    model = types.SimpleNamespace(training=True)
    lse_all, lse_pos = criterion.memory_terms(reps, data["targets"], data["valid"], model, sample={})
    nll = joint_nll(data["token_score"], data["token_logz"], lse_all, lse_pos, valid=data["valid"].reshape(-1))
    loss = nll.sum()
    loss.backward()
    return {"loss": loss.detach(), "reps_grad": reps.grad}


def _model_case(model, criterion, sample: dict) -> dict:
    model.zero_grad()
    model.train()
    loss, _, logging_output = criterion(model, sample)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "log": logging_output}


def main(rank: int, world: int, init_method: str, dict_dir: str, out: str) -> None:
    import torch.distributed as dist

    from trime.criterions.trime_ext_loss import TrimeExtLoss
    from trime.distributed import DUMMY_BATCH_KEY

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    long_args = ["--keep-order", "--max-tokens", "8", "--train-mem-size", "16"]  # C = 2
    task, model, long_crit = build(dict_dir, "trime_long_loss", long_args)
    ext_crits = {ratio: TrimeExtLoss(task, cross_sent_ratio=ratio) for ratio in (0.0, 1.0)}
    results = {}

    rep_data = rep_case_data()[rank]
    results["rep_long"] = _rep_case(long_crit, rep_data)
    for ratio, ext_crit in ext_crits.items():
        results[f"rep_ext_{ratio}"] = _rep_case(ext_crit, rep_data)

    batch = model_case_batch(task.source_dictionary)
    own = slice_batch(batch, MODEL_ROWS[rank])
    results["model_long"] = _model_case(model, long_crit, own)
    results["model_ext"] = _model_case(model, ext_crits[0.0], own)
    # rank 1 runs fairseq's (marked) dummy batch: it must join the gather but offer no keys
    dummy = dict(own, **{DUMMY_BATCH_KEY: True}) if rank == 1 else own
    results["model_ext_dummy"] = _model_case(model, ext_crits[0.0], dummy)
    results["model_long_dummy"] = _model_case(model, long_crit, dummy)

    torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
