"""trime: TRIME (Zhong, Lei & Chen, EMNLP 2022) for fairseq (a plugin) and Hugging Face causal LMs.

Map of the package, lower layers first (math ← adapters and front-ends ← tools ← CLIs; a
module imports only from its own layer or lower ones):

- core math: ``trime.loss`` (the TRIME loss in pure torch), ``trime.loss_compile``, ``trime.memories``
- heads: ``trime.heads``, the token heads' terms of the loss (softmax, adaptive softmax)
- core helpers: ``trime.errors``, ``trime.io_utils``, ``trime.knn``, ``trime.databin``,
  ``trime.distributed``, ``trime.batch_plans``
- fairseq front-end: ``trime.hooks``, ``trime.criterions``, ``trime.tasks``, ``trime.models``, ``trime.plugin``
- HF front-end: ``trime.hf`` (``causal_lm_loss``, key capture, text and batching)
- adapters: ``trime.adapters``, one model interface (fairseq or HF) for datastores and evaluation
- tools: ``trime.data_prep`` (datasets), ``trime.retrieval`` (BM25 plans, datastores, kNN search),
  ``trime.eval`` (evaluation memories, tuning)
- CLIs: ``trime.cli`` (their one style), ``trime-prepare``, ``trime-train``, ``trime-bm25-batches``,
  ``trime-build-datastore``, ``trime-eval``, ``trime-hf-train``, ``trime.demo`` (``make demo``)

Importing ``trime`` is cheap: it pulls in neither torch nor fairseq. The fairseq
components (criteria, archs, tasks) are registered by :func:`trime.plugin.register`,
which runs automatically when fairseq's option parser is imported (see
``trime/_autoload.py``) or when fairseq loads this directory with ``--user-dir``.
"""

import sys

from trime.version import __version__

__all__ = ["__version__"]

if "fairseq.options" in sys.modules:  # loaded through --user-dir: register now
    from trime.plugin import register as _register

    _register()
