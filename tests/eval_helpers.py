"""Shared by the evaluation, datastore and alignment tests: tiny fairseq checkpoints and CLI helpers.

The checkpoints are trained once per session with the real ``fairseq-train`` (2 layers x 32 dims): a
cross-entropy model with a full softmax and a TrimeLM (``trime_loss``) with an adaptive softmax.
:class:`Reference` scores their windows independently of trime: windows rebuilt from the raw token
stream, keys from a hook on ``final_layer_norm`` (not the fc1 hook trime uses), python sums.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tests.tiny_lm import tiny_lm_argv

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TPS, CONTEXT = 64, 32  # checkpoint window and evaluation context (32 new tokens per window)

TRAIN_COMMON = [
    "--task", "language_modeling",
    *tiny_lm_argv(32, io_dims=True, dropout=0.1, tokens_per_sample=TPS, max_tokens=512, lr="0.005"),
    "--sample-break-mode", "none", "--max-update", "8", "--no-epoch-checkpoints", "--disable-validation",
    "--log-format", "none",
]  # fmt: skip
MODELS = {
    "ce": ["--criterion", "cross_entropy", "--share-decoder-input-output-embed"],
    "trime": ["--criterion", "trime_loss", "--adaptive-softmax-cutoff", "400,2000", "--adaptive-softmax-dropout", "0"],
}


def tiny_checkpoints(tmp_path_factory, data_bin: Path) -> dict:
    """Train (once per session) the tiny CE and TrimeLM checkpoints; returns {name: checkpoint path}."""
    root = tmp_path_factory.getbasetemp() / "trime_tiny_checkpoints"
    paths = {name: root / name / "checkpoint_last.pt" for name in MODELS}
    if all(p.is_file() for p in paths.values()):
        return paths
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            [str(BIN / "fairseq-train"), str(data_bin), *TRAIN_COMMON, *extra, "--save-dir", str(root / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for name, extra in MODELS.items()
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and paths[name].is_file(), f"fairseq-train ({name}) failed:\n{out[-3000:]}"
    return paths


def run_cli(*argv, timeout=300):
    return subprocess.run(
        [str(BIN / argv[0]), *map(str, argv[1:])], check=False, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert err and err[-1].startswith("trime: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in err[-1]


class Reference:
    """Independent per-token probabilities for the first windows of a split."""

    def __init__(self, lm, split, context, mem_size):
        from fairseq.data import data_utils

        self.lm, self.context = lm, context
        self.n = TPS - context
        raw = data_utils.load_indexed_dataset(str(lm.data_dir / split), lm.dictionary)
        stream = torch.cat([raw[i] for i in range(len(raw))])
        eos = lm.dictionary.eos()
        self.src = torch.cat([torch.tensor([eos]), stream[:-1]])  # src[p] predicts tgt[p]
        self.tgt = stream
        self.mem_size = mem_size
        self.keys = {}  # src position -> key computed in its own window

    def window(self, w):
        """(input tokens, first src position, number of context tokens) of window w."""
        start = w * self.n
        lo = max(0, start - self.context)
        hi = min(len(self.src), start + self.n)
        return self.src[lo:hi], lo, start - lo

    def run(self, w):
        """Keys (via final_layer_norm hook) and full token-head data for window w."""
        model = self.lm.model
        grabbed = {}
        handle = model.decoder.layers[-1].final_layer_norm.register_forward_hook(
            lambda mod, inp, out: grabbed.__setitem__("k", out.detach())
        )
        tokens, lo, _ = self.window(w)
        with torch.no_grad():
            feats, _ = model(tokens[None], features_only=True)
        handle.remove()
        keys = grabbed["k"][:, 0]  # (T, d): fairseq layers are time-major
        return keys, feats[0], lo

    def vocab_terms(self, feat):
        """(list of unnormalised scores per vocabulary id, Z_t) of one position, in float64 python."""
        dec = self.lm.model.decoder
        if dec.adaptive_softmax is not None:
            asm = dec.adaptive_softmax
            head = asm.head(feat[None]).double()[0].tolist()
            z = math.fsum(math.exp(v) for v in head)
            logp = asm.get_log_prob(feat[None, None], None)[0, 0].double().tolist()
            return [z * math.exp(v) for v in logp], z
        logits = dec.output_layer(feat[None]).double()[0].tolist()
        scores = [math.exp(v) for v in logits]
        return scores, math.fsum(scores)

    def log_probs(self, windows, temp, ext=None, lmbda=0.0, interp_temp=1.0, ext_temp=None):
        """log P of every scored token of the given windows (explicit sums)."""
        out = []
        scale = 1.0 / math.sqrt(self.lm.dim) / temp
        ext_scale = scale if ext_temp is None else 1.0 / math.sqrt(self.lm.dim) / ext_temp
        for w in windows:
            keys, feats, lo = self.run(w)
            _, _, ctx = self.window(w)
            start = w * self.n
            fifo = [p for p in range(max(0, start - self.mem_size), start)] if self.mem_size else []
            for t in range(ctx, keys.shape[0]):
                p = lo + t
                y = int(self.tgt[p])
                q = keys[t].double()
                entries = []  # (logit, label)
                for j in range(t):  # local: earlier positions of the window, minus context held in the FIFO
                    if lo + j in fifo:
                        continue
                    entries.append((float(q @ keys[j].double()) * scale, int(self.tgt[lo + j])))
                for pj in fifo:
                    entries.append((float(q @ self.keys[pj].double()) * scale, int(self.tgt[pj])))
                knn = []
                if ext is not None:
                    ext_keys, ext_vals, k = ext
                    sims = ext_keys @ q.numpy()
                    top = np.argsort(-sims)[:k]
                    knn = [(float(sims[i]), int(ext_vals[i])) for i in top]
                    entries += [(s * ext_scale, v) for s, v in knn]
                vocab, z = self.vocab_terms(feats[t])
                num = vocab[y] + math.fsum(math.exp(s) for s, lab in entries if lab == y)
                den = z + math.fsum(math.exp(s) for s, _ in entries)
                prob = num / den
                if lmbda > 0:
                    knn_den = math.fsum(math.exp(s / interp_temp) for s, _ in knn)
                    knn_num = math.fsum(math.exp(s / interp_temp) for s, v in knn if v == y)
                    prob = (1 - lmbda) * prob + lmbda * knn_num / knn_den
                out.append(math.log(prob))
            for t in range(ctx, keys.shape[0]):
                self.keys[lo + t] = keys[t]
        return out
