"""One rank of the 2-process (gloo, CPU) test of ``trime.hf.causal_lm_loss`` with long and external memory.

Run by ``tests/test_hf_train.py`` from the repository root as
``python -m tests._hf_dist_worker RANK WORLD INIT_METHOD OUT``.
Each rank holds rows :data:`RANK_ROWS` of the deterministic batch :func:`global_batch`
(uneven on purpose), computes the loss of each case on a tiny float64 GPT-2 and saves
the summed NLL, its token count and the parameter gradients of the summed NLL to OUT.
"""

import sys

import torch

RANK_ROWS = [range(0, 2), range(2, 5)]
SEQ_LEN = 9
CASES = [("long", True), ("external", True), ("external", False)]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the concatenated 5-row batch; right padding in rows 1 and 4."""
    from tests.hf_helpers import right_padding, sample_batch

    return sample_batch(5, SEQ_LEN, seed=11), right_padding(5, SEQ_LEN, {1: 2, 4: 3})


def main(rank: int, world: int, init_method: str, out: str) -> None:
    import torch.distributed as dist

    from tests.hf_helpers import build_model
    from trime.hf import causal_lm_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    model = build_model("gpt2", seed=3, dtype=torch.float64)
    ids, mask = global_batch()
    rows = torch.as_tensor(list(RANK_ROWS[rank]))
    results = {}
    for memory, external_local in CASES:
        model.zero_grad()
        result = causal_lm_loss(model, ids[rows], memory, attention_mask=mask[rows], external_local=external_local)
        result.loss_sum.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        results[(memory, external_local)] = {
            "loss_sum": result.loss_sum.detach(), "num_tokens": result.num_tokens, "grads": grads
        }
    torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
