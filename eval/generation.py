"""Generation with memory: the next-token distribution of :mod:`trime.eval.memory`, token by token.

:class:`Generator` extends a prompt through any :class:`trime.adapters.base.ModelAdapter`'s
:class:`~trime.adapters.base.IncrementalDecoder`: the model's KV cache is kept, every new position
is computed once, and its key (the last FFN's input, :class:`trime.hooks.KeyCapture`) joins the
memory as soon as the token it predicts is chosen. Every step scores the whole vocabulary with
:func:`trime.eval.memory.next_token_log_probs`, the function evaluation scores its targets with,
over the memories of ``trime-eval``:

- ``local``: the prompt and the generated tokens, plus the context rows of the window's input
  (each beam keeps its own);
- ``long``: plus a FIFO of the last ``mem_size`` tokens of a context stream read before the prompt
  (``--context-file``), their keys computed in evaluation windows (:meth:`ModelAdapter.stream_windows`);
- ``external``: plus the datastore's ``k`` neighbours of every query, in the joint softmax and/or
  interpolated (``lmbda``), with ``--cache interp`` for the continuous cache, as in evaluation.

The model input is one window: :meth:`ModelAdapter.window_head` (the last ``--context-window``
tokens of the context, as an evaluation window whose first new token is the prompt's would hold
them), then the prompt and the generated tokens, up to the model's positions. A context row whose
token is also in the FIFO counts once, from the FIFO, as in evaluation. So teacher-forced
(:meth:`Generator.score`), generation gives every token the log-probability ``trime-eval`` gives
it in that window, within fp32 round-off.

Decoding (:class:`Decoding`, Hugging Face ``generate``'s names and defaults): greedy, sampling
(temperature, then top-k, then top-p, as HF's warpers) and beam search (HF's: ``2 x num_beams``
candidates a step, hypotheses ranked by log P / length ** ``length_penalty``, its early-stop
heuristic). Generation stops at the adapter's stop tokens (HF's ``eos_token_id``, fairseq's end of
line) and never picks :meth:`ModelAdapter.never_generated` (fairseq's padding), like fairseq's
SequenceGenerator.
"""

import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trime.adapters.base import DecoderStep, ModelAdapter, WindowSettings
from trime.errors import fail
from trime.eval.engine import model_not_finite, search_datastore
from trime.eval.memory import MemoryEntries, MemorySettings, next_token_log_probs, require_finite
from trime.io_utils import progress_meter
from trime.knn import KnnResults

# a running beam's score when it must not be picked (HF's value)
_EXCLUDED = -1.0e9


@dataclass(frozen=True)
class Decoding:
    """How tokens are chosen, with Hugging Face ``generate``'s names and defaults."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # sampling: keep the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: keep the most likely tokens whose probabilities sum to top_p
    num_beams: int = 1
    seed: int | None = None  # sampling: the generator's seed (None: a fresh one)
    length_penalty: float = 1.0  # beam search: hypotheses rank by log P / length ** length_penalty

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.top_k < 0:
            raise ValueError("max_new_tokens and num_beams must be >= 1, top_k >= 0")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("beam sampling (do_sample with num_beams > 1) is not offered")

    def describe(self) -> str:
        """``greedy``, ``sampling (temperature T, top-k K, top-p P, seed S)`` or ``beam search (N beams)``."""
        if self.num_beams > 1:
            return f"beam search ({self.num_beams} beams)"
        if not self.do_sample:
            return "greedy"
        seed = f", seed {self.seed}" if self.seed is not None else ""
        return f"sampling (temperature {self.temperature:g}, top-k {self.top_k}, top-p {self.top_p:g}{seed})"


@dataclass
class GeneratedToken:
    """One generated (or teacher-forced) token and where its probability came from."""

    id: int
    text: str  # the adapter's decoding of the token alone
    log_prob: float  # log P(token) with memory (fp32)
    prob: float  # P(token) with memory
    lm_prob: float  # the model's own probability, without memory
    memory_prob: float  # the part of ``prob`` that came from memory (the rest came from the token head)

    def as_dict(self) -> dict:
        return {"id": self.id, "token": self.text, "prob": self.prob, "lm_prob": self.lm_prob,
                "memory_prob": self.memory_prob}


@dataclass
class Generation:
    """A prompt's continuation: its token ids (with a final stop token, when it stopped) and their records."""

    prompt_ids: list[int]
    ids: list[int]
    tokens: list[GeneratedToken]
    text: str  # the continuation's text, without a final stop token
    stopped: bool  # ended with a stop token (else it reached max_new_tokens)

    @property
    def log_prob(self) -> float:
        """Sum of log P of the generated tokens (a beam's score before length normalisation)."""
        return math.fsum(t.log_prob for t in self.tokens)


class LocalMemory:
    """The local memory of B rows: the keys (fp32) of the window's rows whose next token is known, their labels
    and whether they count (context rows held in the FIFO do not); all rows share their length and validity."""

    def __init__(self, capacity: int, dim: int, device: torch.device) -> None:
        self.keys = torch.zeros(1, capacity, dim, dtype=torch.float32, device=device)
        self.labels = torch.zeros(1, capacity, dtype=torch.long, device=device)
        self.valid = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.size = 0

    def append(self, keys: Tensor, labels: Tensor, valid: Tensor | None = None) -> None:
        """Add (B, n, d) keys with (B, n) labels (``valid`` (n,): which count; all by default)."""
        n = keys.shape[1]
        if self.size + n > self.keys.shape[1]:
            raise ValueError("the local memory is full: its capacity is the window's length")
        self.keys[:, self.size : self.size + n] = keys
        self.labels[:, self.size : self.size + n] = labels
        self.valid[self.size : self.size + n] = True if valid is None else valid
        self.size += n

    def reorder(self, rows: Tensor) -> None:
        self.keys, self.labels = self.keys.index_select(0, rows), self.labels.index_select(0, rows)

    def scores(self, queries: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h . h_j (B, size) fp32, labels (B, size), valid (B, size)) of each row's query against its rows."""
        scores = torch.einsum("bd,bnd->bn", queries.float(), self.keys[:, : self.size])
        return scores, self.labels[:, : self.size], self.valid[None, : self.size].expand_as(scores)


@dataclass
class _Stream:
    """One prompt being extended: the decoder, its last step, the query of the last position, the local memory."""

    decoder: object
    step: DecoderStep
    query: Tensor  # (B, d)
    local: LocalMemory
    rows: int = 1

    def keep(self, rows: Tensor) -> None:
        """Keep rows ``rows`` (B',) of everything, in this order; a row may repeat (beam search)."""
        self.decoder.reorder(rows)
        self.local.reorder(rows)
        self.query = self.query.index_select(0, rows)
        self.step = DecoderStep(*(x.index_select(0, rows) for x in (self.step.reps, self.step.token_scores,
                                                                     self.step.token_logz)))
        self.rows = int(rows.numel())

    def advance(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        """Each row (after keeping ``rows``) reads its next token (B,): its query joins the memory labelled
        with the token, and the model runs on the token."""
        if rows is not None:
            self.keep(rows)
        self.local.append(self.query[:, None], tokens[:, None])
        self.step = self.decoder.feed(tokens[:, None])
        self.query = self.step.reps[:, -1]


@dataclass
class _Candidate:
    """A beam-search hypothesis: its token ids and their records."""

    ids: list[int] = field(default_factory=list)
    tokens: list[GeneratedToken] = field(default_factory=list)


class Generator:
    """Generation and teacher-forced scoring with one model, memory settings, datastore and context stream.

    ``windows``: ``--context-window`` (how much of the context the model reads before the prompt) and
    ``--tokens-per-sample`` (the windows in which the context's keys are computed for the FIFO).
    ``context``: the token ids read before every prompt (``--context-file``, :meth:`ModelAdapter.encode_file`).
    ``batch_size``: windows per forward pass over the context; ``exact``: ``--knn-exact``.
    """

    def __init__(
        self,
        lm: ModelAdapter,
        settings: MemorySettings,
        windows: WindowSettings,
        store=None,
        context: np.ndarray | None = None,
        batch_size: int = 1,
        exact: bool = False,
        progress: bool = False,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        needs_store = settings.knn_in_joint or settings.lmbda > 0
        if needs_store and store is None:
            raise ValueError("external memory and kNN-LM interpolation need a datastore (store)")
        if needs_store and settings.k is None:
            raise ValueError("searching a datastore needs settings.k")
        self.lm, self.settings, self.windows = lm, settings, windows
        self.store = store if needs_store else None
        self.exact = exact
        self.context = np.zeros(0, dtype=np.int64) if context is None else context
        self.head = lm.window_head(self.context, windows)
        self.stops = set(lm.stop_tokens())
        self.banned = sorted(set(lm.never_generated()))
        self.fifo_keys, self.fifo_labels = self._long_memory(batch_size, progress, log)

    @property
    def fifo_size(self) -> int:
        """Entries of the long-term memory: the last ``mem_size`` scored tokens of the context (fewer in a short one)."""
        return 0 if self.fifo_keys is None else int(self.fifo_keys.shape[0])

    def _long_memory(self, batch_size: int, progress: bool, log: Callable[[str], None]) -> tuple[Tensor | None, ...]:
        """The FIFO after the context stream: the keys and targets of its last ``mem_size`` scored tokens, each key
        computed in its own evaluation window (as ``trime-eval`` fills it before the window of the prompt)."""
        if not self.settings.uses_long or len(self.context) == 0:
            return None, None
        windows = self.lm.stream_windows(self.context, self.windows)
        total = windows.num_batches(batch_size)
        keys: Tensor | None = None
        labels: Tensor | None = None
        for sample in progress_meter(windows.batches(batch_size), total=total, desc="context", unit="batch",
                                     bar=progress, log=log):
            batch = self.lm.forward(sample, need_token_terms=False)
            queries = batch.queries
            if not bool(torch.isfinite(queries).all()):
                model_not_finite(self.lm, "context")
            keys = queries if keys is None else torch.cat([keys, queries])[-self.settings.mem_size :]
            labels = batch.targets if labels is None else torch.cat([labels, batch.targets])[-self.settings.mem_size :]
        if keys is None:
            return None, None
        return keys[-self.settings.mem_size :].float(), labels[-self.settings.mem_size :]

    # ---------------------------------------------------------------- the window and its memory

    def _start(self, prompt_ids: Sequence[int], new_tokens: int) -> _Stream:
        """Run the model on the window's head and the prompt; the rows whose next token is known join the memory."""
        tokens = list(self.head) + [int(t) for t in prompt_ids]
        if not tokens:
            fail("an empty prompt gives the model nothing to continue (the first token of a Hugging Face stream is "
                 "not predicted); give it some text, or a --context-file to read first")
        limit = self.lm.max_input_tokens()
        needed = len(tokens) + new_tokens - 1
        if limit is not None and needed > limit:
            fail(f"a prompt of {len(prompt_ids):,} tokens after {len(self.head):,} of context, and --max-new-tokens "
                 f"{new_tokens:,}, need {needed:,} positions, more than the model's {limit:,}; lower --max-new-tokens "
                 "or --context-window, or shorten the prompt")
        decoder = self.lm.start_decoding()
        step = decoder.feed(torch.tensor([tokens], dtype=torch.long))
        local = LocalMemory(len(tokens) + new_tokens, step.reps.shape[-1], step.reps.device)
        context_rows = max(0, len(self.head) - 1)
        valid = torch.ones(len(tokens) - 1, dtype=torch.bool)
        valid[max(0, context_rows - self.fifo_size) : context_rows] = False  # their tokens are in the FIFO
        labels = torch.tensor([tokens[1:]], dtype=torch.long, device=step.reps.device)
        local.append(step.reps[:, :-1], labels, valid.to(step.reps.device))
        return _Stream(decoder, step, step.reps[:, -1], local)

    def _distribution(self, stream: _Stream) -> tuple[Tensor, Tensor, Tensor]:
        """(log P with memory, log of the token head's part of P, the model's own log p), each (B, V)."""
        step, settings = stream.step, self.settings
        if not bool(torch.isfinite(step.token_scores).all() & torch.isfinite(stream.query).all()):
            model_not_finite(self.lm, "prompt")
        entries = None
        if settings.uses_context_terms:
            scores, labels, valid = stream.local.scores(stream.query)
            if self.fifo_keys is not None:
                fifo = stream.query.float() @ self.fifo_keys.T
                scores = torch.cat([scores, fifo], dim=1)
                labels = torch.cat([labels, self.fifo_labels[None].expand(stream.rows, -1)], dim=1)
                valid = torch.cat([valid, torch.ones_like(fifo, dtype=torch.bool)], dim=1)
            entries = MemoryEntries(scores, labels, valid)
        knn: KnnResults | None = None
        if self.store is not None:
            knn = search_datastore(self.store, stream.query, settings.k, self.exact, stream.query.device)
        log_p, log_token = next_token_log_probs(step.token_scores, step.token_logz, settings, self.lm.dim, entries, knn)
        require_finite(torch.logsumexp(log_p, dim=-1), settings)  # NaN or overflow of a memory score
        return log_p, log_token, step.token_scores - step.token_logz[:, None]

    def _record(self, token: int, log_p: Tensor, log_token: Tensor, lm_log_p: Tensor) -> GeneratedToken:
        """The record of ``token`` from one row's (V,) distributions."""
        lp = float(log_p[token])
        prob = math.exp(lp)
        return GeneratedToken(id=token, text=self.lm.decode([token]), log_prob=lp, prob=prob,
                              lm_prob=math.exp(float(lm_log_p[token])),
                              memory_prob=max(0.0, prob - math.exp(float(log_token[token]))))

    def _finish(self, prompt_ids: Sequence[int], ids: list[int], tokens: list[GeneratedToken]) -> Generation:
        stopped = bool(ids) and ids[-1] in self.stops
        return Generation(prompt_ids=[int(t) for t in prompt_ids], ids=ids, tokens=tokens,
                          text=self.continuation(prompt_ids, ids[:-1] if stopped else ids), stopped=stopped)

    def continuation(self, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
        """The text ``ids`` add after the prompt: the decoded prompt + ids past the decoded prompt (so that a
        tokenizer that drops a leading space of a text's first token keeps it), else the ids' own text."""
        prompt = self.lm.decode(list(prompt_ids))
        whole = self.lm.decode(list(prompt_ids) + list(ids))
        return whole[len(prompt) :] if whole.startswith(prompt) else self.lm.decode(list(ids))

    # ---------------------------------------------------------------- public entry points

    def score(self, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> list[GeneratedToken]:
        """Teacher forcing: the record of each token of ``continuation_ids`` after the prompt, each read as if
        generated (stop tokens included); the same steps as :meth:`generate`."""
        forced = [int(t) for t in continuation_ids]
        if not forced:
            return []
        stream = self._start(prompt_ids, len(forced))
        out = []
        for i, token in enumerate(forced):
            log_p, log_token, lm_log_p = self._distribution(stream)
            out.append(self._record(token, log_p[0], log_token[0], lm_log_p[0]))
            if i + 1 < len(forced):
                stream.advance(torch.tensor([token], device=stream.query.device))
        return out

    def generate(self, prompt_ids: Sequence[int], decoding: Decoding | None = None) -> Generation:
        """The continuation of ``prompt_ids`` under ``decoding`` (default greedy, 20 tokens; sampling, beam search)."""
        decoding = decoding or Decoding()
        if decoding.num_beams > 1:
            return self._beam_search(prompt_ids, decoding)
        stream = self._start(prompt_ids, decoding.max_new_tokens)
        sampler = None
        if decoding.do_sample:
            sampler = torch.Generator(device=stream.query.device)
            sampler.manual_seed(decoding.seed if decoding.seed is not None else secrets.randbits(63))
        ids: list[int] = []
        tokens: list[GeneratedToken] = []
        for i in range(decoding.max_new_tokens):
            log_p, log_token, lm_log_p = self._distribution(stream)
            scores = self._allowed(log_p)
            if sampler is None:
                token = int(scores[0].argmax())
            else:
                probs = torch.softmax(warp(scores, decoding), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=sampler)[0, 0])
            ids.append(token)
            tokens.append(self._record(token, log_p[0], log_token[0], lm_log_p[0]))
            if token in self.stops:
                break
            if i + 1 < decoding.max_new_tokens:
                stream.advance(torch.tensor([token], device=stream.query.device))
        return self._finish(prompt_ids, ids, tokens)

    def _allowed(self, log_p: Tensor) -> Tensor:
        """``log_p`` with the tokens that are never generated at -inf."""
        if not self.banned:
            return log_p
        return log_p.index_fill(1, torch.tensor(self.banned, device=log_p.device), -math.inf)

    def _beam_search(self, prompt_ids: Sequence[int], decoding: Decoding) -> Generation:
        """Hugging Face's beam search over the memory-augmented distribution; each beam keeps its own memory.

        Each step takes the 2 x num_beams best continuations of all beams by summed log P; those that end (a stop
        token, or the last step) among the first num_beams become hypotheses, scored by summed log P / generated
        length ** length_penalty (the best num_beams are kept), and the best num_beams others run on. The search
        ends when every continuation ends, or when num_beams hypotheses are kept and the best running beam,
        normalised by its current length, scores no higher than the worst of them (HF's early-stop heuristic).
        """
        beams = decoding.num_beams
        stream = self._start(prompt_ids, decoding.max_new_tokens)
        device = stream.query.device
        stream.keep(torch.zeros(beams, dtype=torch.long, device=device))
        running = [_Candidate() for _ in range(beams)]
        running_scores = torch.full((beams,), _EXCLUDED, device=device)
        running_scores[0] = 0.0  # the beams are copies: continue the first only
        finished: list[tuple[float, _Candidate]] = []
        improvable = True
        for step in range(decoding.max_new_tokens):
            dists = self._distribution(stream)
            total = (running_scores[:, None] + self._allowed(dists[0])).reshape(-1)
            top_scores, top_index = total.topk(2 * beams)
            vocab = dists[0].shape[1]
            source, token = (top_index // vocab).tolist(), (top_index % vocab).tolist()
            last = step + 1 == decoding.max_new_tokens
            ends = torch.tensor([last or t in self.stops for t in token], device=device)
            length = (step + 1) ** decoding.length_penalty
            if improvable:
                for rank in range(beams):
                    if ends[rank]:
                        hypothesis = self._extend(running[source[rank]], token[rank], source[rank], dists)
                        finished.append((float(top_scores[rank]) / length, hypothesis))
                finished = sorted(finished, key=lambda item: -item[0])[:beams]
            penalised = top_scores + _EXCLUDED * ends.float()
            keep = penalised.topk(beams).indices.tolist()
            improvable = improvable and (len(finished) < beams or float(penalised[keep[0]]) / length > finished[-1][0])
            if not improvable or bool(ends.all()):
                break
            running = [self._extend(running[source[r]], token[r], source[r], dists) for r in keep]
            running_scores = penalised[keep]
            stream.advance(torch.tensor([token[r] for r in keep], device=device),
                           rows=torch.tensor([source[r] for r in keep], device=device))
        best = finished[0][1]
        return self._finish(prompt_ids, best.ids, best.tokens)

    def _extend(self, parent: _Candidate, token: int, row: int, dists: tuple[Tensor, Tensor, Tensor]) -> _Candidate:
        """``parent`` (the hypothesis of beam ``row``) followed by ``token``, with its record from ``dists``."""
        record = self._record(token, *(d[row] for d in dists))
        return _Candidate(parent.ids + [token], parent.tokens + [record])


def warp(scores: Tensor, decoding: Decoding) -> Tensor:
    """Sampling's filters, in Hugging Face's order: divide by the temperature, keep the top-k (ties kept), keep the
    smallest set of most likely tokens whose probabilities exceed top-p (at least one); the rest get -inf."""
    if decoding.temperature != 1.0:
        scores = scores / decoding.temperature
    if decoding.top_k:
        k = min(decoding.top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -math.inf)
    if decoding.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - decoding.top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -math.inf)
    return scores


def generate(
    lm: ModelAdapter,
    prompts: str | Sequence[str],
    settings: MemorySettings | None = None,
    decoding: Decoding | None = None,
    *,
    store=None,
    context: os.PathLike | np.ndarray | None = None,
    windows: WindowSettings | None = None,
    exact: bool = False,
) -> list[Generation]:
    """Continue each prompt (text) with memory: ``trime-generate`` as a function, for notebooks.

    ``lm`` is a loaded adapter (:func:`trime.adapters.load_adapter`), ``store`` an open
    :class:`trime.retrieval.datastore.Datastore` (external memory, kNN-LM), ``context`` a text file or token
    ids read before every prompt (long-term memory), ``windows`` the window settings (default: the model's,
    :meth:`ModelAdapter.window_settings`). ``settings`` default: no memory; ``decoding``: greedy, 20 tokens.
    """
    settings, decoding = settings or MemorySettings(), decoding or Decoding()
    windows = windows or lm.window_settings(None, None)
    if context is not None and not isinstance(context, np.ndarray):
        context = lm.encode_file(Path(context), "context")
    generator = Generator(lm, settings, windows, store=store, context=context, exact=exact)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    return [generator.generate(lm.encode(text), decoding) for text in texts]
