"""``python -m bench.gpu_check --dry-run``: every section and branch runs, so the prepared GPU check cannot fail on a typo.

The dry run is the GPU check at tiny sizes on the CPU: six child processes (device, loss,
train, knn, eval, hf), fairseq trainers of a 2-layer ``transformer_lm_wiki103``, a datastore
and ``trime-eval --knn-search torch``, and the HF path. Budget: ~35 s on an idle 2-core
machine (most of it interpreter and library start-up in the children); the wrapper and
budget tests add ~8 s.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # six child processes with fairseq trainers, a datastore and trime-eval


def _run(*args, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run("--dry-run", "--out", out / "gpu-check", "--work", out / "work")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu-check.json").read_text()), (out / "gpu-check.md").read_text(), out / "gpu-check.json"


def test_every_section_ran(dry_run):
    report, md, _ = dry_run
    sections = report["sections"]
    assert list(sections) == ["device", "loss", "train", "knn", "eval", "hf"]
    for name, sec in sections.items():
        assert sec["status"] == "ok" or sec["status"].startswith("skipped: trime.hf not available"), (name, sec)
        assert f"## {name}" in md
    env = sections["device"]["result"]["env"]
    assert env["torch"] and report["date"] and "nvidia_smi" in env  # no GPU here: recorded, not fatal
    assert sections["device"]["result"]["matmul_peak"]["tflops"] > 0


def test_loss_section_measures_every_method_and_records_oom(dry_run):
    report, md, _ = dry_run
    loss = report["sections"]["loss"]["result"]
    cells = {(e["dtype"], e["vocab"], e["n"]): e["methods"] for e in loss["results"]}
    assert set(cells) == {(d, v, n) for d in ("bf16", "fp16") for v in (300, 500) for n in (128, 256)}
    for (dtype, vocab, n), methods in cells.items():
        for m in ("ce", "trime_local", "trime_long", "dense_local"):
            assert methods[m]["ok"] and methods[m]["median_ms"] > 0, (dtype, vocab, n, m, methods[m])
        assert methods["trime_local"]["time_vs_ce"] > 0
        # the same loss from the blockwise TRIME code and the dense replica of the original (local rule)
        assert methods["trime_local"]["loss"] == pytest.approx(methods["dense_local"]["loss"], rel=2e-2)
        # the dry run's simulated OOM: recorded at N=128, and larger sizes skipped
        dense_long = methods["dense_long"]
        assert dense_long["oom"] and not dense_long["ok"]
        assert ("simulated" in dense_long["error"]) == (n == 128)
    assert loss["dense_oom_at"]["bf16/V300/dense_long"] == 128
    assert "OOM" in md


def test_train_section_ratios_flops_and_checkpoint(dry_run):
    report, _, _ = dry_run
    train = report["sections"]["train"]["result"]
    results = train["results"]
    assert set(results) == {"adaptive_loss", "trime_loss", "trime_long_loss_same_device", "trime_ext_loss"}
    assert all(r["words_per_s"] > 0 and r["ratio_vs_adaptive_loss"] > 0 for r in results.values())
    # the analytic model FLOPs agree with torch's FLOP counter on the baseline's step
    analytic = train["flops"]["analytic"]["step_flops"]
    counted = train["flops"]["counted_per_step"]
    assert counted["adaptive_loss"] == pytest.approx(analytic, rel=0.01)
    assert counted["trime_long_loss_same_device"] > counted["adaptive_loss"]  # memory scores are extra work
    assert train["mfu"]["per_criterion"]["trime_loss"]["mfu_vs_documented_790"] > 0
    assert "checkpoint_seconds" in train


def test_knn_and_eval_sections(dry_run):
    report, md, _ = dry_run
    knn = report["sections"]["knn"]["result"]
    assert {(r["count"], r["metric"]) for r in knn["runs"]} == {(c, m) for c in (2000, 4000) for m in ("ip", "l2")}
    assert all(r["queries_per_s"] > 0 for r in knn["runs"])
    for metric in ("ip", "l2"):
        assert knn["exactness"][metric]["recall_vs_fp32"] == 1.0
        if "version" in knn["faiss"]:
            assert knn["exactness"][metric]["recall_fp32_vs_faiss_flat"] == 1.0
    assert "faiss-gpu" in knn["faiss"]["faiss_gpu"]
    ev = report["sections"]["eval"]["result"]
    assert ev["datastore"]["keys"] > 0
    rows = ev["results"]
    assert set(rows) == {"warm-up (none)", "none", "long", "external"}
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert "--knn-search" in rows["external"]["argv"] and rows["none"]["vs_none"] == 1.0
    assert rows["warm-up (none)"]["ppl"] == pytest.approx(rows["none"]["ppl"])


def test_hf_section(dry_run):
    report, _, _ = dry_run
    hf = report["sections"]["hf"]["result"]
    if hf.get("skipped_reason"):
        pytest.skip(hf["skipped_reason"])
    methods = hf["methods"]
    assert set(methods) == {"hf_plain", "trime_none", "trime_local", "trime_long"}
    assert all(m["ok"] and m["median_ms"] > 0 for m in methods.values())
    # memory "none" is the plain HF loss (bf16 logits, fp32 loss)
    assert abs(methods["trime_none"]["loss_minus_plain"]) < 1e-2


def test_global_budget_and_a_hanging_section(dry_run, tmp_path):
    # a budget too small for any box: every section is skipped without starting a child
    proc = _run("--dry-run", "--budget-s", "2", "--out", tmp_path / "tiny", "--work", tmp_path / "w1", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert all(s["status"].startswith("skipped: global budget") for s in report["sections"].values())
    # a section that hangs is killed at its box (+ grace); what it recorded is kept, the run goes on
    proc = _run("--dry-run", "--sections", "device", "--budget-s", "10", "--grace-s", "1", "--simulate-hang", "device",
                "--out", tmp_path / "hang", "--work", tmp_path / "w2", timeout=60)
    report = json.loads((tmp_path / "hang.json").read_text())
    device = report["sections"]["device"]
    assert device["status"].startswith("timed out") and proc.returncode == 1
    assert device["result"]["env"]["torch"]
    # a rerun's sections replace the first run's in the merged report
    proc = _run("--merge", dry_run[2], tmp_path / "hang.json", "--out", tmp_path / "merged", timeout=60)
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["sections"]["device"]["status"].startswith("timed out")
    assert merged["sections"]["train"] == dry_run[0]["sections"]["train"] and len(merged["merged_runs"]) == 2


def test_wrapper_without_bring_alongs_is_one_clear_line(tmp_path):
    fake = tmp_path / "python3"  # a python that lacks fairseq (as the device machine does)
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), GPU_BRINGALONG=str(tmp_path / "missing"))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=30)
    assert proc.returncode == 2
    assert "missing: run make gpu-bringalong" in proc.stderr.strip().splitlines()[-1]
