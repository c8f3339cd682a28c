"""``trime-hf-train`` faults: a diverging run, a resume that does not match, numeric flags, a full disk.

Tiny random GPT-2 models with the tokenizer trained in ``hf_helpers``, a few CPU steps each,
mostly in-process (a :class:`trime.errors.TrimeError` is the one ``trime: error:`` line the
command prints). Real damage only: checkpoint files removed or cut short as a kill or a full
disk leaves them, a real ``SIGKILL`` during a save, a real full disk (a small tmpfs, as root).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.hf_helpers import SAMPLE_TRAIN, build_model, hf_train_argv, load_test_tokenizer, model_dir, text_head
from trime.errors import TrimeError
from trime.hf.model import CHECKPOINT_RECORD, RECORD
from trime.hf.train import build_parser
from trime.hf.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
BLOCK = 32
BATCH = 4


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """(train, other train): the first ~24 KB and ~20 KB of the shipped WikiText-2 sample."""
    root = tmp_path_factory.mktemp("hf_fault_text")
    return text_head(SAMPLE_TRAIN, root / "train.txt", 24_000), text_head(SAMPLE_TRAIN, root / "other.txt", 20_000)


def argv(texts, out, *extra, steps=3, lr="1e-3", model=None):
    return hf_train_argv(model or model_dir("gpt2"), texts[0], out, "local", *extra, block=BLOCK, batch=BATCH,
                         steps=steps, lr=lr)


def error(args) -> str:
    """The one line a failing ``trime-hf-train`` prints."""
    with pytest.raises(TrimeError) as err:
        train_main(args)
    message = str(err.value)
    assert "\n" not in message and message.startswith("trime: error: ")
    return message


def saved_model(out: Path) -> bool:
    return (out / "model.safetensors").exists() or (out / RECORD).exists()


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A save_pretrained dir factory: ``saved_dir(name, model)`` with the test tokenizer beside it."""
    root = tmp_path_factory.mktemp("hf_fault_models")

    def make(name, model):
        path = root / name
        if not path.exists():
            model.save_pretrained(path)
            load_test_tokenizer().save_pretrained(path)
        return path

    return make


# ----------------------------------------------------------------------------- a diverging run


def test_a_diverging_loss_stops_the_run_and_writes_no_model(texts, tmp_path):
    out = tmp_path / "o"
    message = error(argv(texts, out, lr="1e6"))
    assert "training diverged: the training loss is nan at step 2" in message
    assert "--learning-rate 1e+06 is likely too high" in message and "no model was written" in message
    assert not saved_model(out) and not list(out.glob("checkpoint-*"))


def test_fp16_weights_on_the_cpu_are_named_and_never_saved(texts, tmp_path):
    """After one step every fp16 weight is NaN while the loss was finite: the weights are checked before a save."""
    out = tmp_path / "o"
    message = error(argv(texts, out, "--dtype", "fp16", "--save-steps", "1", steps=1))
    assert "training diverged: 28 of 28 weight tensors" in message and "are not finite after step 1" in message
    assert "--dtype fp16 keeps the weights in fp16" in message and "use --dtype float32" in message
    assert not saved_model(out) and not list(out.glob("checkpoint-*"))


def test_finite_but_ruined_weights_are_never_saved(texts, tmp_path):
    """One step at a huge learning rate: the weights stay finite, the next loss would be NaN; a probe forward
    before every save catches it."""
    out = tmp_path / "o"
    message = error(argv(texts, out, lr="1e6", steps=1))
    assert "training diverged: the loss of a training block is nan after step 1" in message
    assert not saved_model(out) and not list(out.glob("checkpoint-*"))


def test_a_model_with_nan_weights_is_refused(texts, tmp_path, saved_dir):
    model = build_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    path = saved_dir("nan", model)
    message = error(argv(texts, tmp_path / "o", model=path))
    assert message.startswith(f"trime: error: --model {path} ") and "NaN" in message  # caught at load or here
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- numeric flags


@pytest.mark.parametrize("flag,value", [
    ("--gradient-accumulation-steps", "0"), ("--learning-rate", "nan"), ("--learning-rate", "inf"),
    ("--learning-rate", "0"), ("--block-size", "1"), ("--per-device-train-batch-size", "0"), ("--save-steps", "0"),
    ("--logging-steps", "0"), ("--adam-beta2", "1"), ("--warmup-steps", "-1"), ("--seed", "-1"),
    ("--num-train-epochs", "nan"), ("--max-grad-norm", "inf"), ("--cross-sent-ratio", "1.5"),
    ("--memory-block-size", "0"), ("--max-steps", "-2"), ("--eval-steps", "0"), ("--lora-r", "0"),
    ("--lora-dropout", "1"), ("--data-seed", "-1"), ("--adam-epsilon", "0"), ("--weight-decay", "nan"),
    ("--warmup-steps", "inf"), ("--dataloader-prefetch-factor", "0"),
])
def test_numeric_flags_are_one_usage_line_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--model", "m", "--train-file", "t", "--output-dir", "o", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"trime: error: argument {flag}: must be ")


def test_max_steps_zero_and_unknown_transformers_names_are_one_line(texts, tmp_path, capsys):
    assert "--max-steps must be >= 1, or -1" in error(argv(texts, tmp_path / "o", steps=0))
    for option in ("--optim", "--lr-scheduler-type"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            train_main(argv(texts, tmp_path / "o", option, "bogus"))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1
        assert err.startswith(f"trime: error: argument {option}: bogus is not a transformers name; use one of ")
    message = error(argv(texts, tmp_path / "o", "--report-to", "bogus"))
    assert message.startswith("trime: error: transformers refuses these flags: bogus is not supported")


def test_a_tokenizer_beyond_the_embeddings_is_one_line(texts, tmp_path, saved_dir):
    path = saved_dir("small-vocab", build_model("gpt2", vocab_size=256))
    message = error(argv(texts, tmp_path / "o", model=path))
    assert "has 512 tokens but the model has 256 input embeddings" in message


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def run4(texts, tmp_path_factory):
    """4 steps with checkpoint-2 and checkpoint-4 (constant LR), the final model: copy before changing it."""
    out = tmp_path_factory.mktemp("hf_fault_run") / "o"
    train_main(argv(texts, out, "--save-steps", "2", "--lr-scheduler-type", "constant", steps=4))
    return out


def copy_run(run4, tmp_path) -> Path:
    out = tmp_path / "o"
    shutil.copytree(run4, out)
    return out


def resume_argv(texts, out, *extra, model=None):
    return argv(texts, out, "--save-steps", "2", "--lr-scheduler-type", "constant", "--resume-from-checkpoint",
                *extra, steps=6, model=model)


def test_every_checkpoint_records_the_settings_and_identities(run4):
    from trime.hf.text import text_file_identity, tokenizer_identity

    for step in (2, 4):
        saved = json.loads((run4 / f"checkpoint-{step}" / CHECKPOINT_RECORD).read_text())
        settings = saved["settings"]
        assert settings["memory"] == "local" and settings["block_size"] == BLOCK and settings["world_size"] == 1
        assert settings["lora_r"] is None and settings["train_sampling_strategy"] == "random"
        assert settings["tokenizer"] == tokenizer_identity(load_test_tokenizer())
        assert settings["train_data"] == text_file_identity(saved["shown"]["train_data"])


def test_a_resume_with_other_settings_names_each_difference(texts, run4, tmp_path):
    out = copy_run(run4, tmp_path)
    args = resume_argv(texts, out, "--memory", "long", "--block-size", "16", "--seed", "7")
    args[args.index("--train-file") + 1] = str(texts[1])
    message = error(args)
    assert f"--resume-from-checkpoint {out}/checkpoint-4 was trained with --memory local (now long); " in message
    assert "--block-size 32 (now 16); " in message and "--seed 1 (now 7)" in message
    assert f"--train-file {texts[0]} (now {texts[1]}: other content)" in message
    assert not (out / "checkpoint-6").exists()


def test_a_resume_onto_another_model_shape_is_one_line(texts, run4, tmp_path, saved_dir):
    out = copy_run(run4, tmp_path)
    wide = saved_dir("wide", build_model("gpt2", n_embd=64))
    message = error(resume_argv(texts, out, model=wide))
    assert f"holds a model of another shape than --model {wide}" in message
    assert "is 96 there, 192 here" in message and "resume with the --model it was trained from" in message


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_without_optimizer_or_scheduler_is_refused(texts, run4, tmp_path, name):
    out = copy_run(run4, tmp_path)
    (out / "checkpoint-4" / name).unlink()
    message = error(resume_argv(texts, out))
    assert f"--resume-from-checkpoint {out}/checkpoint-4 cannot be resumed: it has no {name}" in message
    assert f"start a new run from its weights with --model {out}/checkpoint-4" in message


@pytest.mark.parametrize("damage", ["no trainer_state", "cut trainer_state", "cut weights", "cut optimizer"])
def test_an_interrupted_save_is_skipped_for_the_last_complete_checkpoint(texts, run4, tmp_path, capsys, damage):
    """What a kill or a full disk leaves in checkpoint-4; the resume continues from checkpoint-2, saying so."""
    out = copy_run(run4, tmp_path)
    name = {"no trainer_state": "trainer_state.json", "cut trainer_state": "trainer_state.json",
            "cut weights": "model.safetensors", "cut optimizer": "optimizer.pt"}[damage]
    path = out / "checkpoint-4" / name
    if damage == "no trainer_state":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # the checkpoint named explicitly is refused, with the one to use
    message = error(resume_argv(texts, out) + [str(out / "checkpoint-4")])
    assert f"{out}/checkpoint-4 cannot be resumed" in message and f"resume from {out}/checkpoint-2" in message
    if damage != "no trainer_state":
        return
    capsys.readouterr()
    train_main(argv(texts, out, "--save-steps", "2", "--lr-scheduler-type", "constant", "--resume-from-checkpoint",
                    steps=4))
    assert f"skipping {out}/checkpoint-4: it has no trainer_state.json" in capsys.readouterr().err
    record = json.loads((out / RECORD).read_text())
    assert record["resumes"] == [{"checkpoint": f"{out}/checkpoint-2", "global_step": 2}]
    from safetensors.torch import load_file

    resumed, whole = load_file(out / "model.safetensors"), load_file(run4 / "model.safetensors")
    for key in whole:  # the same 4 steps as the uninterrupted run
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)


def test_resume_words_max_steps_and_an_output_dir_given_as_checkpoint(texts, run4, tmp_path):
    out = copy_run(run4, tmp_path)
    message = error(argv(texts, out, "--save-steps", "2", "--lr-scheduler-type", "constant", "--resume-from-checkpoint",
                         steps=4))
    assert f"--max-steps 4 ends at or before step 4 of --resume-from-checkpoint {out}/checkpoint-4" in message
    message = error(resume_argv(texts, out) + [str(out)])
    assert f"--resume-from-checkpoint {out} is an output dir, not a checkpoint" in message
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    message = error(resume_argv(texts, out) + ["True"])  # transformers' spelling of "the last one"
    assert f"no complete checkpoint in --output-dir {out}" in message


# ----------------------------------------------------------------------------- kills and full disks


@pytest.mark.slow  # a subprocess run killed during a save, then resumed
def test_a_run_killed_during_a_save_resumes_from_the_last_complete_checkpoint(texts, tmp_path):
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trime.hf.train", *argv(texts, out, "--save-steps", "1", steps=40)]
    log = tmp_path / "killed.err"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.time() + 120
            while not (out / "checkpoint-3").exists():  # the save of step 3 has begun
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    done = newest.name.split("-")[1]
    proc = subprocess.run([sys.executable, "-m", "trime.hf.train",
                           *argv(texts, out, "--save-steps", "1", "--resume-from-checkpoint", steps=int(done) + 2)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if not (newest / "trainer_state.json").exists():  # the kill landed in the save (the usual case)
        assert f"skipping {newest}: it has no trainer_state.json" in proc.stderr
    assert json.loads((out / RECORD).read_text())["global_step"] == int(done) + 2


@pytest.mark.parametrize("size,steps,save", [("900k", 3, "1"), ("720k", 1, "100")])
def test_a_full_disk_is_one_line_and_leaves_no_partial_save(texts, small_disk, size, steps, save):
    """900k: the second checkpoint does not fit; 720k: checkpoint-1 fits, the final model does not."""
    out = small_disk(size) / "o"
    message = error(argv(texts, out, "--save-steps", save, steps=steps))
    assert message.startswith("trime: error: No space left on device writing ")
    assert not saved_model(out) and not (out / ".trime-final.tmp").exists()
    for checkpoint in out.glob("checkpoint-*"):  # what stays is complete
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / CHECKPOINT_RECORD).is_file()
