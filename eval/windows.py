"""Checkpoint loading, evaluation windows and the batched forward pass (shared by eval and datastore).

Windowing follows ``fairseq-eval-lm --context-window C`` (reference section 3.1): the split
is cut into blocks of ``tokens_per_sample - C`` new tokens (break mode ``none``) and
fairseq's ``LMContextWindowDataset`` prepends up to ``C`` previous tokens to each block.
Only the new tokens are scored; the context tokens are memory keys whose labels are
their true next tokens.

Batches are fixed runs of ``batch_size`` consecutive windows, so a window's numbers do
not depend on where a run (or a datastore shard) starts.
"""

import hashlib
import logging
import math
import os
import pickle
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trime.errors import fail
from trime.hooks import ffn_input_capture, last_ffn_layer
from trime.io_utils import sha256_file

# Files at most this large are hashed whole; bigger ones get size + mtime + partial hashes.
FULL_HASH_MAX_BYTES = 256 << 20
PARTIAL_HASH_BYTES = 16 << 20
# What torch.load / unpickling raise for a file that is not a readable checkpoint.
CHECKPOINT_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, AttributeError, pickle.UnpicklingError)
# Largest (rows x vocabulary) block of fp32 token logits held at once.
TOKEN_LOGIT_BUDGET = 1 << 26


def file_identity(path: os.PathLike) -> dict:
    """A stable identity for a file: sha256 for small files, else size/mtime/head+tail sha256."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size <= FULL_HASH_MAX_BYTES:
        return {"path": str(path), "bytes": stat.st_size, "sha256": sha256_file(path)}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(PARTIAL_HASH_BYTES))
        f.seek(-PARTIAL_HASH_BYTES, os.SEEK_END)
        digest.update(f.read(PARTIAL_HASH_BYTES))
    return {
        "path": str(path),
        "bytes": stat.st_size,
        "mtime": int(stat.st_mtime),
        "partial_sha256": digest.hexdigest(),
    }


def identity_key(identity: dict) -> str:
    """The hash part of :func:`file_identity` (what must match between two files)."""
    return identity.get("sha256") or f"{identity['bytes']}:{identity['partial_sha256']}"


def quiet_libraries() -> None:
    """For the CLIs: warnings and errors only (importing fairseq sets the root logger to DEBUG).

    Also keeps FAISS's loader chatter, matplotlib's font search and a known torch
    warning about fairseq's padding masks off the output.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("fairseq", "faiss", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")


@dataclass
class LoadedLM:
    """A checkpoint ready for scoring, with the task that owns its dictionary."""

    model: torch.nn.Module
    task: object
    cfg: object
    path: Path
    data_dir: Path
    device: torch.device
    dtype: torch.dtype
    dim: int
    ckpt_tokens_per_sample: int
    dict_sha256: str
    identity: dict  # file_identity of the checkpoint, taken when it was loaded

    @property
    def dictionary(self):
        return self.task.source_dictionary


def pick_device(cpu: bool) -> torch.device:
    """cuda:0 when a GPU is present and ``--cpu`` is not given, else the CPU."""
    if not cpu and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _check_training_dictionary(cfg, data_dir: Path, dict_sha: str) -> None:
    """Fail if the checkpoint's training data-bin is present and has another dict.txt."""
    trained_on = str(getattr(cfg.task, "data", "") or "").split(os.pathsep)[0]
    if not trained_on:
        return
    trained_dict = Path(trained_on) / "dict.txt"
    same_file = trained_dict.is_file() and trained_dict.resolve() == (data_dir / "dict.txt").resolve()
    if trained_dict.is_file() and not same_file and sha256_file(trained_dict) != dict_sha:
        fail(
            f"{data_dir / 'dict.txt'} differs from the dictionary the checkpoint was trained with "
            f"({trained_dict}); binarize the data with that dictionary "
            f"(fairseq-preprocess --only-source --srcdict {trained_dict})"
        )


def load_lm(path: os.PathLike, data_dir: os.PathLike, cpu: bool = False, precision: str = "fp32") -> LoadedLM:
    """Load a fairseq LM checkpoint for evaluation on the data-bin ``data_dir``.

    ``precision`` is ``fp32``, ``fp16`` or ``bf16`` (the model weights); all log-probabilities
    are computed in fp32 regardless.
    """
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import open_dict

    path, data_dir = Path(path), Path(data_dir)
    if not path.is_file():
        fail(f"--path {path} does not exist; pass a checkpoint written by fairseq-train/trime-train")
    if not (data_dir / "dict.txt").is_file():
        fail(f"{data_dir} is not a fairseq data-bin (no dict.txt); pass the directory written by trime-prepare")
    dict_sha = sha256_file(data_dir / "dict.txt")
    identity = file_identity(path)
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    except CHECKPOINT_READ_ERRORS as e:
        fail(
            f"--path {path} could not be read as a fairseq checkpoint ({type(e).__name__}: {e}); "
            "re-download or re-train it"
        )
    cfg = state.get("cfg")
    if cfg is None:
        fail(f"--path {path} has no 'cfg' (a fairseq < 0.10 checkpoint?); re-save it with fairseq 0.12")
    _check_training_dictionary(cfg, data_dir, dict_sha)
    overwrite_args_by_name(cfg, {"data": str(data_dir)})
    with open_dict(cfg.task):
        cfg.task.data = str(data_dir)
    if getattr(cfg.task, "add_bos_token", False):
        fail(f"--path {path} was trained with --add-bos-token, which trime-eval does not support")
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], state=state)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            fail(
                f"{data_dir / 'dict.txt'} ({len(_read_dict_lines(data_dir))} types) does not match the "
                f"vocabulary of --path {path}; evaluate on the data-bin the checkpoint was trained with"
            )
        raise
    model = models[0]
    fc1 = last_ffn_layer(model)
    device = pick_device(cpu)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if dtype is not torch.float32:
        model = model.to(dtype)
    model = model.to(device)
    model.prepare_for_inference_(cfg)
    model.eval()
    return LoadedLM(
        model=model,
        task=task,
        cfg=cfg,
        path=path,
        data_dir=data_dir,
        device=device,
        dtype=dtype,
        dim=fc1.in_features,
        ckpt_tokens_per_sample=int(cfg.task.tokens_per_sample),
        dict_sha256=dict_sha,
        identity=identity,
    )


def _read_dict_lines(data_dir: Path) -> list[str]:
    with open(data_dir / "dict.txt", encoding="utf-8", errors="replace") as f:
        return f.readlines()


@dataclass
class WindowSettings:
    """``tokens_per_sample`` = context + new tokens of a full window (as in fairseq-eval-lm)."""

    tokens_per_sample: int
    context_window: int

    @property
    def new_tokens(self) -> int:
        return self.tokens_per_sample - self.context_window

    def as_dict(self) -> dict:
        return {
            "tokens_per_sample": self.tokens_per_sample,
            "context_window": self.context_window,
            "new_tokens_per_window": self.new_tokens,
        }


def window_settings(lm: LoadedLM, context_window: int, tokens_per_sample: int | None) -> WindowSettings:
    """Resolve ``--context-window``/``--tokens-per-sample`` against the checkpoint and check them."""
    tps = lm.ckpt_tokens_per_sample if tokens_per_sample is None else tokens_per_sample
    if context_window < 0:
        fail(f"--context-window must be >= 0, got {context_window}")
    if tps - context_window < 1:
        fail(
            f"--context-window {context_window} leaves no new tokens in a window of {tps} "
            f"(--tokens-per-sample); use a context window below {tps}"
        )
    max_positions = lm.model.max_positions()
    if isinstance(max_positions, tuple):
        max_positions = max_positions[0]
    if max_positions is not None and tps > max_positions:
        fail(f"--tokens-per-sample {tps} exceeds the model's {max_positions} positions; use at most {max_positions}")
    return WindowSettings(tokens_per_sample=tps, context_window=context_window)


def load_windows(lm: LoadedLM, split: str, settings: WindowSettings):
    """The split as evaluation windows (``LMContextWindowDataset`` when there is a context)."""
    from fairseq.data import LMContextWindowDataset
    from omegaconf import open_dict

    task = lm.task
    with open_dict(task.args):
        task.args.tokens_per_sample = settings.new_tokens
        task.args.sample_break_mode = "none"
        task.args.shorten_data_split_list = ""
        task.args.pad_to_fixed_length = False
        task.args.pad_to_fixed_bsz = False
    try:
        task.load_dataset(split)
    except FileNotFoundError:
        fail(
            f"{lm.data_dir} has no split '{split}' ({split}.bin/.idx); "
            "pick another --gen-subset or re-run trime-prepare"
        )
    dataset = task.dataset(split)
    if settings.context_window > 0:
        dataset = LMContextWindowDataset(
            dataset=dataset,
            tokens_per_sample=settings.new_tokens,
            context_window=settings.context_window,
            pad_idx=lm.dictionary.pad(),
        )
    return dataset


def batch_size_for(settings: WindowSettings, batch_size: int | None, max_tokens: int | None) -> int:
    """Windows per batch: ``--batch-size``, else ``--max-tokens`` // window length (at least 1)."""
    if batch_size is not None:
        if batch_size < 1:
            fail(f"--batch-size must be >= 1, got {batch_size}")
        return batch_size
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be >= 1, got {max_tokens}")
    return max(1, (max_tokens or 8192) // settings.tokens_per_sample)


def num_batches(dataset, batch_size: int) -> int:
    return math.ceil(len(dataset) / batch_size)


def iter_samples(dataset, batch_size: int, first_batch: int = 0, end_batch: int | None = None) -> Iterator[dict]:
    """Collated batches ``first_batch .. end_batch-1`` of consecutive windows, in order.

    ``LMContextWindowDataset`` builds each window's context from the windows collated
    before it, so when starting mid-split the preceding windows are collated first
    (cheap, no model) to reproduce exactly the context of a run from the start.
    """
    n = len(dataset)
    end_batch = num_batches(dataset, batch_size) if end_batch is None else end_batch
    start = first_batch * batch_size
    context_window = getattr(dataset, "context_window", 0)
    if context_window:
        dataset.prev_tokens = np.empty([0])
        new_tokens = max(1, dataset.tokens_per_sample)
        warm_from = max(0, start - math.ceil(context_window / new_tokens) - 1)
        if warm_from < start:
            dataset.collater([dataset[i] for i in range(warm_from, start)])
    for b in range(first_batch, end_batch):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        if lo >= hi:
            break
        yield dataset.collater([dataset[i] for i in range(lo, hi)])


@dataclass
class WindowBatch:
    """One forward pass over a batch of windows (everything detached).

    Positions are (B, T); *scored* positions are the new tokens (after ``start_indices``,
    non-pad targets), flattened row-major into N query rows.
    """

    ids: list[int]
    reps: Tensor  # (B, T, d) last-FFN inputs of every position, model dtype
    key_labels: Tensor  # (B, T) next-token label of every position (pad where none)
    key_valid: Tensor  # (B, T) position has a real token and a label
    scored: Tensor  # (B, T) position is scored
    starts: list[int]  # first scored position of each window
    targets: Tensor  # (N,) targets of the scored positions
    token_score: Tensor  # (N,) fp32 log(Z_t p_tok(y))
    token_logz: Tensor  # (N,) fp32 log Z_t

    @property
    def queries(self) -> Tensor:
        return self.reps[self.scored]

    @property
    def num_scored(self) -> int:
        return int(self.targets.numel())

    def scored_per_window(self) -> list[int]:
        return self.scored.sum(dim=1).tolist()

    def to(self, device: torch.device) -> "WindowBatch":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return WindowBatch(**moved)


def _token_terms(model, features: Tensor, targets: Tensor):
    """(log Z_t p(y), log Z_t) for selected feature rows, in blocks to bound the logits' memory."""
    from trime.criterions.trime_loss import token_head_terms

    adaptive = getattr(model.decoder, "adaptive_softmax", None)
    vocab = len(model.decoder.dictionary)
    rows = max(1, TOKEN_LOGIT_BUDGET // max(1, vocab))
    scores, logzs = [], []
    for lo in range(0, features.shape[0], rows):
        feats, tgt = features[lo : lo + rows], targets[lo : lo + rows]
        head_input = feats if adaptive is not None else model.decoder.output_layer(feats)
        score, logz = token_head_terms(model, (head_input,), tgt)
        scores.append(score.float())
        logzs.append(logz.float())
    if not scores:
        empty = features.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(scores), torch.cat(logzs)


@torch.no_grad()
def forward_batch(lm: LoadedLM, sample: dict, need_token_terms: bool = True) -> WindowBatch:
    """Run the model on one collated batch; capture keys and the token-head terms of scored rows."""
    pad = lm.dictionary.pad()
    src = sample["net_input"]["src_tokens"]
    target = sample["target"]
    bsz, length = src.shape
    starts = list(sample.get("start_indices", [0] * bsz))
    src_dev = src.to(lm.device)
    capture = ffn_input_capture(lm.model)
    with capture:
        features, _ = lm.model(
            src_dev, src_lengths=sample["net_input"]["src_lengths"].to(lm.device), features_only=True
        )
    reps = capture.pop().detach()  # (B, T, d)
    positions = torch.arange(length)[None, :]
    start_t = torch.tensor(starts)[:, None]
    is_context = positions < start_t
    scored = (~is_context) & target.ne(pad)
    # context labels are the true next tokens (the next source token); scored ones are the targets
    next_src = src.roll(-1, dims=1)
    key_labels = torch.where(is_context, next_src, target)
    key_valid = src.ne(pad) & key_labels.ne(pad)
    scored_dev = scored.to(lm.device)
    targets = target[scored].to(lm.device)
    if need_token_terms:
        token_score, token_logz = _token_terms(lm.model, features[scored_dev], targets)
    else:
        token_score = token_logz = torch.zeros(0)
    return WindowBatch(
        ids=[int(i) for i in sample["id"]],
        reps=reps,
        key_labels=key_labels.to(lm.device),
        key_valid=key_valid.to(lm.device),
        scored=scored_dev,
        starts=starts,
        targets=targets,
        token_score=token_score,
        token_logz=token_logz,
    )
