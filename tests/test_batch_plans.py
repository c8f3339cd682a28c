"""``trime.batch_plans``: plan checks against the data they are used with (fairseq data-bins and HF text).

The meta is checked before the ids, so a plan of other data says so, with both sizes,
instead of reporting a misleading id range (such as "not a permutation of 0..2114"
for a data-bin of 2,125 segments).
"""

import numpy as np
import pytest

from trime.batch_plans import TEXT_PLAN_KIND, PlanTarget, check_plan, read_batch_plan, write_batch_plan
from trime.errors import TrimeError

IDENTITY = {"dataset": {"dict_sha256": "a" * 64}}


def target(num_segments=2125, **kw):
    return PlanTarget(description="the train split of bin", tokens_per_sample=128, num_segments=num_segments,
                      identity=kw.pop("identity", IDENTITY), rebuild="trime-bm25-batches bin --tokens-per-sample 128",
                      **kw)


def plan(tmp_path, ids, **meta):
    path = tmp_path / "plan.json"
    write_batch_plan(path, np.asarray(ids), {"tokens_per_sample": 128, "num_segments": len(ids), **IDENTITY, **meta})
    return read_batch_plan(path)


def message(ids, meta, tgt) -> str:
    with pytest.raises(TrimeError) as err:
        check_plan(ids, meta, tgt)
    assert "\n" not in str(err.value) and meta["path"] in str(err.value)
    return str(err.value)


def test_a_matching_plan_passes(tmp_path):
    ids, meta = plan(tmp_path, np.random.default_rng(0).permutation(2125))
    check_plan(ids, meta, target())


def test_plan_of_another_data_bin_says_so_with_both_sizes(tmp_path):
    ids, meta = plan(tmp_path, np.arange(2115))
    text = message(ids, meta, target())
    assert "has 2115 segments but the train split of bin has 2,125" in text and "belongs to other data" in text
    assert "permutation" not in text and "rebuild it with: trime-bm25-batches bin" in text


def test_damaged_ids_name_the_data_and_the_problem(tmp_path):
    ids, meta = plan(tmp_path, [0, 0] + list(range(2, 2125)))
    text = message(ids, meta, target())
    assert "is damaged" in text and "2,125 segment ids 0..2,124 of the train split of bin" in text
    assert "1 ids repeat and 1 are missing" in text


def test_text_plan_and_data_bin_plan_are_not_interchangeable(tmp_path):
    ids, meta = plan(tmp_path, np.arange(2125), kind=TEXT_PLAN_KIND, tokenizer="t" * 64)
    assert "over a tokenizer's blocks of a text file, not for the train split of bin" in message(ids, meta, target())
    ids, meta = plan(tmp_path, np.arange(2125))
    text_target = target(kind=TEXT_PLAN_KIND, identity={**IDENTITY, "tokenizer": "t" * 64}, tokens_flag="--block-size")
    assert "was built for a fairseq data-bin" in message(ids, meta, text_target)


def test_other_tokenizer_and_block_size_are_refused(tmp_path):
    ids, meta = plan(tmp_path, np.arange(2125), kind=TEXT_PLAN_KIND, tokenizer="u" * 64)
    text_target = target(kind=TEXT_PLAN_KIND, identity={**IDENTITY, "tokenizer": "t" * 64}, tokens_flag="--block-size")
    assert "was built for another tokenizer (identity uuuuuuuuuuuu... there" in message(ids, meta, text_target)
    text_target.tokens_per_sample = 64
    assert "--tokens-per-sample 128 but training uses --block-size 64" in message(ids, meta, text_target)
