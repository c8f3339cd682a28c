"""The ``transformers.Trainer`` of ``trime-hf-train`` (:func:`make_trainer_class`), divergence checks and the final save.

:class:`TrimeTrainer` overrides ``compute_loss`` with :func:`trime.hf.causal_lm_loss`, so HF's
logging, checkpointing, resume, mixed precision, DDP, DeepSpeed and FSDP work as usual. Training
stops with one line at the first non-finite loss, and no checkpoint or model is saved from
non-finite (or ruined) weights. Every checkpoint gets the run's settings record, written before
transformers' files; a checkpoint whose save fails is removed. :func:`save_final_model` writes the
output dir through a staging folder (a LoRA run: the merged model, with the adapter in ``adapter/``).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from trime.errors import fail
from trime.hf.lora import ADAPTER_DIR, is_peft_model, merged_model
from trime.hf.model import CHECKPOINT_RECORD, RECORD
from trime.hf.resume import checkpoints_newest_first, save_fault
from trime.io_utils import write_json_atomic
from trime.loss import DEFAULT_BLOCK_SIZE
from trime.memories import local_off

FINAL_STAGING = ".trime-final.tmp"  # the final model is saved here, then moved into --output-dir file by file



def divergence_cause(learning_rate: float, weight_dtype: torch.dtype, fp16: bool, before_any_update: bool) -> str:
    """The likely cause of a non-finite loss or weights, and the fix, for the one-line error."""
    if weight_dtype == torch.float16 and not fp16:
        return ("--dtype fp16 keeps the weights in fp16, where the optimizer's updates overflow; use --dtype float32 "
                "(with --bf16, or --fp16 on a GPU, for mixed precision)")
    if before_any_update:
        return f"the model gives a non-finite loss before any update (in {weight_dtype}); use --dtype float32"
    if fp16:
        return f"fp16 mixed precision overflowed; use --bf16, or lower --learning-rate {learning_rate:g}"
    return f"--learning-rate {learning_rate:g} is likely too high; lower it (or add --warmup-steps)"


def non_finite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf (one device sync in all)."""
    named = list(model.named_parameters())
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def describe_names(names: list[str], total: int) -> str:
    """``N of M weight tensors (first, second, ...)`` for a message."""
    shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
    return f"{len(names)} of {total} weight tensors ({shown})"


# ----------------------------------------------------------------------------- the Trainer


def make_trainer_class():
    """:class:`TrimeTrainer`, defined lazily so that importing this module does not import transformers."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from trime.distributed import world_size_and_rank
    from trime.hf.loss import causal_lm_loss

    class TrimeTrainer(Trainer):
        """``Trainer`` whose loss is :func:`trime.hf.causal_lm_loss` (see the module doc).

        Training stops with one line at the first non-finite loss, and no checkpoint is saved from
        non-finite weights. Every checkpoint gets ``checkpoint_record`` (:data:`CHECKPOINT_RECORD`),
        written before transformers' files; a checkpoint whose save fails is removed.
        """

        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

        def __init__(self, *args, memory: str = "local", ordered: bool = False, ce_warmup_steps: int = 0,
                     cross_sent_ratio: float = 0.9, key_module: Optional[str] = None,
                     memory_block_size: int = DEFAULT_BLOCK_SIZE, checkpoint_record: Optional[dict] = None,
                     **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.checkpoint_record = checkpoint_record
            self.memory = memory
            self.ordered = ordered
            self.ce_warmup_steps = ce_warmup_steps
            self.cross_sent_ratio = cross_sent_ratio
            self.key_module = key_module
            self.memory_block_size = memory_block_size
            self._sums = {True: self._zero_sums(), False: self._zero_sums()}  # by model.training
            self._micro = (-1, 0)  # (global step, forwards in it), for the external coin

        @staticmethod
        def _zero_sums() -> dict:
            return {"ori": 0.0, "norm": 0.0, "tokens": 0, "norm_tokens": 0, "off": 0, "draws": 0}

        def _get_train_sampler(self, train_dataset=None):
            if self.ordered:  # long / external: the dataset is laid out in step order (trime.hf.data)
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
            return super()._get_train_sampler(train_dataset)

        def _external_local(self, training: bool) -> bool:
            if self.memory != "external" or not training:
                return True
            step = self.state.global_step
            micro = self._micro[1] if self._micro[0] == step else 0
            self._micro = (step, micro + 1)
            off = local_off(self.args.seed, world_size_and_rank()[1], step, micro, self.cross_sent_ratio)
            sums = self._sums[True]
            sums["off"] += int(off)
            sums["draws"] += 1
            return not off

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            training = model.training
            warmup = training and self.state.global_step < self.ce_warmup_steps
            memory = "none" if warmup else self.memory
            out = causal_lm_loss(
                model,
                inputs["input_ids"],
                memory,
                attention_mask=inputs.get("attention_mask"),
                labels=inputs.get("labels"),
                external_local=self._external_local(training) if memory != "none" else True,
                key_module=self.key_module,
                block_size=self.memory_block_size,
            )
            sums = self._sums[training]
            ori = float(out.ori_loss_sum.detach())  # the logged sums sync anyway: the finite check is free
            norm = ori if memory == "none" else float(out.loss_sum.detach())
            if training and not (math.isfinite(ori) and math.isfinite(norm)):
                self.diverged(f"the training loss is {norm if not math.isfinite(norm) else ori}")
            sums["ori"] += ori
            sums["tokens"] += out.num_tokens
            if memory != "none":
                sums["norm"] += norm
                sums["norm_tokens"] += out.num_tokens
            return (out.loss, {"logits": out.logits}) if return_outputs else out.loss

        def diverged(self, what: str, when: str = "") -> None:
            """Fail with one line: ``what`` at the current step (or ``when``), the likely cause, what was kept."""
            dtype = next(self.model.parameters()).dtype
            fresh = self.state.global_step == 0
            cause = divergence_cause(self.args.learning_rate, dtype, self.args.fp16, before_any_update=fresh)
            when = when or f"at step {self.state.global_step + 1}"
            fail(f"training diverged: {what} {when}; {cause}; {self.kept()}")

        def check_trained_loss(self) -> None:
            """Before a save: one forward on the first training block must give a finite loss.

            Weights can stay finite and still be ruined (a huge learning rate on the last step),
            and each step checks the loss before its update only.
            """
            model = self.model
            ids = self.train_dataset[0]["input_ids"][None].to(self.args.device)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out = causal_lm_loss(model, ids, "none" if self.memory == "none" else "local",
                                         key_module=self.key_module, block_size=self.memory_block_size,
                                         across_ranks=False)
            finally:
                model.train(was_training)
            value = float(out.loss.detach())
            if not math.isfinite(value):
                self.diverged(f"the loss of a training block is {value}", f"after step {self.state.global_step}")

        def kept(self) -> str:
            """What a failed run leaves: no model, and the checkpoints saved before."""
            saved = checkpoints_newest_first(Path(self.args.output_dir))
            return f"no model was written ({saved[0]} stays)" if saved else "no model was written"

        def check_weights(self) -> None:
            """Fail with one line (as :meth:`diverged`) when a weight is NaN or inf."""
            bad = non_finite_weights(self.model)
            if bad:
                total = sum(1 for _ in self.model.parameters())
                dtype = next(self.model.parameters()).dtype
                cause = divergence_cause(self.args.learning_rate, dtype, self.args.fp16, before_any_update=False)
                fail(f"training diverged: {describe_names(bad, total)} are not finite after step "
                     f"{self.state.global_step}; {cause}; {self.kept()}")

        def _save_checkpoint(self, model, trial) -> None:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self.check_weights()
            self.check_trained_loss()
            try:
                if self.args.should_save and self.checkpoint_record is not None:
                    write_json_atomic(folder / CHECKPOINT_RECORD, self.checkpoint_record)
                super()._save_checkpoint(model, trial)
            except Exception as err:
                fault = save_fault(err, folder)
                if self.args.should_save:  # never leave a half-written checkpoint behind
                    shutil.rmtree(folder, ignore_errors=True)
                if fault is err:
                    raise
                raise fault from None

        def _flush(self, training: bool, prefix: str) -> dict:
            sums = self._sums[training]
            values = torch.tensor([sums[k] for k in ("ori", "tokens", "norm", "norm_tokens", "off", "draws")],
                                  dtype=torch.float64, device=self.args.device)
            if world_size_and_rank()[0] > 1:
                torch.distributed.all_reduce(values)
            ori, tokens, norm, norm_tokens, off, draws = values.tolist()
            self._sums[training] = self._zero_sums()
            logs = {}
            if tokens:
                logs[f"{prefix}ori_loss"] = ori / tokens
            if norm_tokens:
                logs[f"{prefix}norm_loss"] = norm / norm_tokens
            if draws:
                logs[f"{prefix}local_off"] = off / draws
            return logs

        def log(self, logs: dict, start_time: Optional[float] = None) -> None:
            if "loss" in logs:
                logs.update(self._flush(True, ""))
            elif "eval_loss" in logs:
                logs.update(self._flush(False, "eval_"))
                logs["eval_ppl"] = round(math.exp(min(logs["eval_loss"], 50.0)), 2)
            super().log(logs, start_time)

    return TrimeTrainer


# ----------------------------------------------------------------------------- the final save


def _save_model(trainer: Any, folder: Path) -> None:
    """The model into ``folder``; a LoRA run: the adapter (peft's format) into ``folder/adapter``, then the merged model."""
    if not is_peft_model(trainer.model):
        trainer.save_model(str(folder))
        return
    trainer.save_model(str(folder / ADAPTER_DIR))  # the adapter, its config and the tokenizer
    merged = merged_model(trainer.model)
    if trainer.args.should_save:
        merged.save_pretrained(str(folder))
        trainer.processing_class.save_pretrained(str(folder))


def save_final_model(trainer: Any, output_dir: str) -> None:
    """Config, weights and tokenizer into ``output_dir`` (a standard HF model dir), through a staging folder.

    A LoRA run writes the merged model there and the adapter into ``output_dir/adapter``; its
    trainer's model is used up (merged). A save that fails (a full disk) leaves the files already there untouched and no staging folder;
    the training record, written last, is removed first, so a dir with a record always holds its model.
    """
    out = Path(output_dir)
    staging = out / FINAL_STAGING
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        _save_model(trainer, staging)
    except Exception as err:
        fault = save_fault(err, out, "the final model into ")
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        if fault is err:
            raise
        raise fault from None
    if trainer.args.should_save:
        (out / RECORD).unlink(missing_ok=True)
        for path in sorted(staging.iterdir()):
            if (out / path.name).is_dir():
                shutil.rmtree(out / path.name)
            os.replace(path, out / path.name)
        staging.rmdir()


