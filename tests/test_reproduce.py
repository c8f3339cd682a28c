"""``python -m bench.reproduce --quick``: the whole comparison pipeline on the shipped enwik8 sample.

Runs the byte-level variant (three models, no datastores; the word-level one adds two
datastores and five evaluations on the same code paths, which other tests cover), checks
the report against the trime-eval results it was built from, and checks that a second
run resumes from the finished steps instead of training again.
"""

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # three trainings and eight evaluations, twice

EXPECTED_ROWS = [
    ("Transformer", "none"),
    ("Transformer + continuous cache", "long"),
    ("TrimeLM (no memory)", "none"),
    ("TrimeLM", "local"),
    ("TrimeLM + long memory", "long"),
    ("TrimeLM_long (no memory)", "none"),
    ("TrimeLM_long (local only)", "local"),
    ("TrimeLM_long", "long"),
]


def test_reproduce_quick_enwik8_report_and_resume(repo_root, tmp_path):
    work, out = tmp_path / "work", tmp_path / "results" / "reproduce"
    cmd = [sys.executable, "-m", "bench.reproduce", "--quick", "--dataset", "enwik8-prefix",
           "--work", str(work), "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=repo_root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "training trimelm_long" in first.stdout

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["metric"] == "bpc"
    assert [(r["label"], r["memory"]) for r in report["rows"]] == EXPECTED_ROWS
    for row in report["rows"]:  # the table holds exactly what trime-eval wrote for the test split
        tag = f"{row['model']}-{row['memory']}"
        record = json.loads((work / "eval" / f"{tag}.json").read_text())
        test_rows = [r for r in record["results"] if r["subset"] == "test"]
        assert len(test_rows) == 1 and math.isfinite(row["test"])
        assert row["test"] == test_rows[0]["bpc"]
        assert 0 < row["test"] < 8.5  # bits per byte: a trained model is far below log2(vocab)
        if row["memory"] != "none":  # tuned on valid
            assert record["tuning"]["chosen"]["softmax_temp"] > 0
    markdown = out.with_suffix(".md").read_text()
    assert all(f"| {label} | {memory} |" in markdown for label, memory in EXPECTED_ROWS)
    assert out.with_suffix(".png").stat().st_size > 0
    # --jobs 2 (default): the trainings overlap, so the phase's wall time is below the sum of theirs
    phases = report["phase_seconds"]
    assert report["jobs"] == 2 and set(phases) == {"data", "training", "evaluation"}
    assert phases["training"] < 0.9 * sum(report["training_seconds"].values())
    assert report["total_seconds"] == pytest.approx(sum(phases.values()), abs=0.2)

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for step in ("trime-train done", "trime-eval done"):  # every finished step reused, nothing re-run
        assert step not in again.stdout
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == report["rows"]
