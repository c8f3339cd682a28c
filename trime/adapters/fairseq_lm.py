"""The fairseq adapter: a fairseq LM checkpoint scored over a data-bin split.

Windowing follows ``fairseq-eval-lm --context-window C`` (reference section 3.1): the split
is cut into blocks of ``tokens_per_sample - C`` new tokens (break mode ``none``) and
fairseq's ``LMContextWindowDataset`` prepends up to ``C`` previous tokens to each block.
Only the new tokens are scored; the context tokens are memory keys whose labels are
their true next tokens. fairseq is imported only when a checkpoint is loaded.
"""

import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trime.adapters.base import (
    PRECISIONS,
    ModelAdapter,
    SplitWindows,
    WindowBatch,
    WindowSettings,
    check_window_settings,
    default_window_settings,
    pick_device,
    token_terms_in_blocks,
)
from trime.databin import check_data_bin, split_parts
from trime.errors import fail
from trime.heads import token_head_terms
from trime.hooks import KeyCapture, fairseq_key_module
from trime.io_utils import file_identity, sha256_file

# What torch.load / unpickling raise for a file that is not a readable checkpoint.
CHECKPOINT_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, AttributeError, pickle.UnpicklingError)


class FairseqLM(ModelAdapter):
    """A fairseq checkpoint ready for scoring, with the task that owns its dictionary."""

    frontend = "fairseq"

    def __init__(self, model, task, cfg, path: Path, data_dir: Path, device, dtype, dict_sha256: str, identity: dict):
        self.model, self.task, self.cfg = model, task, cfg
        self.path, self.data_dir = path, data_dir
        self.device, self.dtype = device, dtype
        self.key_source, key_module = fairseq_key_module(model)
        self.dim = key_module.in_features
        self.ckpt_tokens_per_sample = int(cfg.task.tokens_per_sample)
        self.identity = identity  # file_identity of the checkpoint, taken when it was loaded
        self.vocab = {"sha256": dict_sha256, "size": len(task.source_dictionary)}
        self.architecture = str(getattr(cfg.model, "arch", None) or getattr(cfg.model, "_name", "") or "")

    @property
    def dictionary(self):
        return self.task.source_dictionary

    @classmethod
    def load(cls, path: os.PathLike, data_dir: os.PathLike, cpu: bool = False, precision: str = "fp32") -> "FairseqLM":
        """Load a fairseq LM checkpoint for evaluation on the data-bin ``data_dir``.

        ``precision`` is ``fp32``, ``fp16`` or ``bf16`` (the model weights); all
        log-probabilities are computed in fp32 regardless.
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
        fairseq_key_module(model)  # a clear error for models without TRIME keys
        device = pick_device(cpu)
        dtype = PRECISIONS[precision]
        if dtype is not torch.float32:
            model = model.to(dtype)
        model = model.to(device)
        model.prepare_for_inference_(cfg)
        model.eval()
        return cls(model, task, cfg, path, data_dir, device, dtype, dict_sha, identity)

    def window_settings(self, context_window: int | None, tokens_per_sample: int | None) -> WindowSettings:
        """Default window: the checkpoint's --tokens-per-sample (as fairseq-eval-lm), half of it as context."""
        max_positions = self.model.max_positions()
        if isinstance(max_positions, tuple):
            max_positions = max_positions[0]
        context_window, tps = default_window_settings(
            context_window, tokens_per_sample, self.ckpt_tokens_per_sample, max_positions
        )
        return check_window_settings(context_window, tps, max_positions)

    def windows(self, split: str, settings: WindowSettings) -> "FairseqWindows":
        """The split as evaluation windows (``LMContextWindowDataset`` when there is a context)."""
        from fairseq.data import LMContextWindowDataset
        from omegaconf import open_dict

        task = self.task
        with open_dict(task.args):
            task.args.tokens_per_sample = settings.new_tokens
            task.args.sample_break_mode = "none"
            task.args.shorten_data_split_list = ""
            task.args.pad_to_fixed_length = False
            task.args.pad_to_fixed_bsz = False
        if split_parts(self.data_dir, split):  # present: refuse an empty one before fairseq mmaps it
            check_data_bin(self.data_dir, [split])
        try:
            task.load_dataset(split)
        except FileNotFoundError:
            fail(
                f"{self.data_dir} has no split '{split}' ({split}.bin/.idx); "
                "pick another --gen-subset or re-run trime-prepare"
            )
        dataset = task.dataset(split)
        if settings.context_window > 0:
            dataset = LMContextWindowDataset(
                dataset=dataset,
                tokens_per_sample=settings.new_tokens,
                context_window=settings.context_window,
                pad_idx=self.dictionary.pad(),
            )
        return FairseqWindows(dataset, settings)

    @torch.no_grad()
    def forward(self, sample: dict, need_token_terms: bool = True) -> WindowBatch:
        """Run the model on one collated batch; capture keys and the token-head terms of scored rows."""
        pad = self.dictionary.pad()
        src = sample["net_input"]["src_tokens"]
        target = sample["target"]
        bsz, length = src.shape
        starts = list(sample.get("start_indices", [0] * bsz))
        # without the head terms, the forward ends at the key (the last FFN and the head are skipped)
        with KeyCapture.fairseq(self.model, stop=not need_token_terms) as capture:
            features, _ = self.model(
                src.to(self.device), src_lengths=sample["net_input"]["src_lengths"].to(self.device), features_only=True
            )
        reps = capture.keys((bsz, length)).detach()  # (B, T, d)
        positions = torch.arange(length)[None, :]
        is_context = positions < torch.tensor(starts)[:, None]
        scored = (~is_context) & target.ne(pad)
        # context labels are the true next tokens (the next source token); scored ones are the targets
        key_labels = torch.where(is_context, src.roll(-1, dims=1), target)
        key_valid = src.ne(pad) & key_labels.ne(pad)
        scored_dev = scored.to(self.device)
        targets = target[scored].to(self.device)
        if need_token_terms:
            token_score, token_logz = self._token_terms(features[scored_dev], targets)
        else:
            token_score = token_logz = torch.zeros(0)
        return WindowBatch(
            ids=[int(i) for i in sample["id"]],
            reps=reps,
            key_labels=key_labels.to(self.device),
            key_valid=key_valid.to(self.device),
            scored=scored_dev,
            starts=starts,
            targets=targets,
            token_score=token_score,
            token_logz=token_logz,
        )

    def _token_terms(self, features, targets):
        """(log Z_t p(y), log Z_t) of the decoder's head (adaptive or full softmax) for feature rows."""
        decoder = self.model.decoder
        adaptive = getattr(decoder, "adaptive_softmax", None)

        def head(feats, tgt):
            head_input = feats if adaptive is not None else decoder.output_layer(feats)
            return token_head_terms(self.model, (head_input,), tgt)

        return token_terms_in_blocks(head, features, targets, len(decoder.dictionary))


class FairseqWindows(SplitWindows):
    """A fairseq (context-window) dataset of one split."""

    def __init__(self, dataset, settings: WindowSettings) -> None:
        self.dataset, self.settings = dataset, settings

    def __len__(self) -> int:
        return len(self.dataset)

    def scored_counts(self) -> np.ndarray:
        # every token of a block has a target: a window scores its block's tokens
        return np.asarray(getattr(self.dataset, "dataset", self.dataset).sizes, dtype=np.int64)

    def batches(self, batch_size: int, first_batch: int = 0, end_batch: int | None = None) -> Iterator[dict]:
        """Collated batches ``first_batch .. end_batch-1`` of consecutive windows, in order.

        ``LMContextWindowDataset`` builds each window's context from the windows collated
        before it, so when starting mid-split the preceding windows are collated first
        (cheap, no model) to reproduce exactly the context of a run from the start.
        """
        dataset = self.dataset
        n = len(dataset)
        end_batch = self.num_batches(batch_size) if end_batch is None else end_batch
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


def _read_dict_lines(data_dir: Path) -> list[str]:
    with open(data_dir / "dict.txt", encoding="utf-8", errors="replace") as f:
        return f.readlines()
