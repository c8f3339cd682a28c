"""FAISS index for the datastore: factory choice, seeded training, chunked adds, GPU placement.

``auto`` picks ``IVF{nlist},PQ{m}np`` (no polysemous training) sized to the datastore:
nlist ~ 4 sqrt(N) rounded to a power of two and clipped so that every list gets at
least ``MIN_POINTS_PER_LIST`` training points; m is the largest divisor of d that is at
most 64 and leaves at least 4 dimensions per sub-quantizer (the paper's 1024-d keys get
64-byte codes). Datastores too small to train 256-centroid PQ codebooks use ``Flat``
(exact search).

GPU: indexes are built and searched on GPUs when ``faiss.get_num_gpus() > 0`` (a
faiss-gpu build), unless disabled. For search with several GPUs the index is sharded
across GPUs 1..n-1, leaving cuda:0 to the model; with one GPU it shares cuda:0.
"""

import contextlib
import errno
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trime.errors import fail
from trime.retrieval.checksums import nonfinite_keys_message

METRICS = ("ip", "l2")
REDUCTIONS = ("pca", "opq")  # --reduce-with: FAISS's PCA, or OPQ's rotation (trained for the PQ codes)
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per centroid
PQ_MIN_TRAIN = 256 * 39  # 8-bit PQ: 256 centroids per sub-quantizer
MAX_NLIST = 65536


def import_faiss():
    """The faiss module, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError:
        fail("the faiss package is not installed; pip install faiss-cpu (or faiss-gpu-cu12 for GPUs)")
    return faiss


def faiss_metric(metric: str) -> int:
    faiss = import_faiss()
    if metric not in METRICS:
        fail(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def num_gpus() -> int:
    """GPUs visible to FAISS (0 for faiss-cpu builds)."""
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:  # CUDA driver missing or broken
        return 0


def pq_subquantizers(dim: int, max_m: int = 64, min_dims_per_sub: int = 4) -> int:
    """Largest divisor m of dim with m <= max_m and dim / m >= min_dims_per_sub (at least 1)."""
    best = 1
    for m in range(1, min(max_m, dim) + 1):
        if dim % m == 0 and dim // m >= min_dims_per_sub:
            best = m
    return best


def auto_factory(count: int, dim: int, reduce_dim: int | None = None, reduce_with: str = "pca") -> str:
    """An IVF-PQ factory string sized to ``count`` keys of ``dim`` dims, or ``Flat`` if too small.

    With ``reduce_dim``, the keys are first projected to that many dimensions by FAISS's PCA (or the
    rotation OPQ trains for the PQ codes, ``reduce_with="opq"``): a transform stored in the index and
    applied to every query, with the IVF-PQ part sized to the reduced keys.
    """
    if reduce_dim is not None and not 0 < reduce_dim < dim:
        fail(f"--reduce-dim must be between 1 and the keys' {dim - 1} dimensions, got {reduce_dim}")
    if reduce_with not in REDUCTIONS:
        fail(f"--reduce-with must be one of {', '.join(REDUCTIONS)}, got {reduce_with!r}")
    inner_dim = reduce_dim or dim
    if count < PQ_MIN_TRAIN:
        inner = "Flat"
    else:
        nlist = 2 ** round(math.log2(4 * math.sqrt(count)))
        nlist = max(16, min(nlist, MAX_NLIST))
        while nlist > 16 and count < MIN_POINTS_PER_LIST * nlist:
            nlist //= 2
        inner = f"IVF{nlist},PQ{pq_subquantizers(inner_dim)}np"
    if reduce_dim is None:
        return inner
    if reduce_with == "opq":
        return f"OPQ{pq_subquantizers(reduce_dim)}_{reduce_dim},{inner}"
    return f"PCA{reduce_dim},{inner}"


def index_bytes_estimate(factory: str, count: int, dim: int) -> int:
    """Rough size of the written index (for the disk-space check)."""
    if factory == "Flat":
        return count * dim * 4 + (1 << 20)
    codes = re.findall(r"(?<!O)PQ(\d+)", factory)  # the PQ code size, not OPQ's transform
    if codes:
        return count * (int(codes[-1]) + 8) + (64 << 20)
    return count * dim * 4 + (64 << 20)


# GPU resources must outlive the GPU indexes that use them: keep them for the process.
_GPU_RESOURCES: list = []
# FAISS GPU indexes return at most this many neighbours per query.
GPU_MAX_K = 2048


def _gpu_resources(count: int):  # pragma: no cover - only with faiss-gpu
    faiss = import_faiss()
    while len(_GPU_RESOURCES) < count:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[:count]


def train_index(
    factory: str,
    metric: str,
    dim: int,
    sample: np.ndarray,
    seed: int,
    use_gpu: bool,
    log: Callable[[str], None] = print,
):
    """An empty index trained on ``sample`` (float32, (n, dim)); k-means seeded with ``seed``."""
    faiss = import_faiss()
    try:
        index = faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as e:
        fail(
            f"--index-factory {factory!r} is not a valid FAISS factory string for {dim}-d keys "
            f"({str(e).splitlines()[0]})"
        )
    ivf = _try_extract_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        nlist = ivf.nlist
        if sample.shape[0] < nlist:
            fail(
                f"--train-sample {sample.shape[0]} is smaller than the {nlist} IVF lists of {factory!r}; "
                "sample more keys or use fewer lists"
            )
    if index.is_trained:
        return index
    if use_gpu and ivf is not None:
        try:
            res = _gpu_resources(1)[0]
            quantizer = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlat(dim, faiss_metric(metric)))
            ivf.clustering_index = quantizer
        except (RuntimeError, AttributeError) as e:  # pragma: no cover - only with faiss-gpu
            log(f"trime: warning: could not train the IVF quantizer on the GPU ({e}); training on the CPU")
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    if ivf is not None:
        ivf.clustering_index = None
    return index


def _try_extract_ivf(index):
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def add_in_chunks(index, keys, chunk: int, progress: Callable[[int], None] | None = None, use_gpu: bool = False,
                  source: object = "keys"):
    """Add ``keys`` (an array or memmap, any float dtype) in chunks; returns the (CPU) index.

    A NaN or inf key is refused (one line naming ``source`` and the row): FAISS would index it silently.
    """
    faiss = import_faiss()
    target = index
    if use_gpu:
        try:  # pragma: no cover - only with faiss-gpu
            co = faiss.GpuClonerOptions()
            co.useFloat16 = True
            target = faiss.index_cpu_to_gpu(_gpu_resources(1)[0], 0, index, co)
        except (RuntimeError, AttributeError) as e:  # pragma: no cover
            print(f"trime: warning: adding on the CPU ({e})", file=sys.stderr)
            target = index
    for lo in range(0, keys.shape[0], chunk):
        block = np.ascontiguousarray(keys[lo : lo + chunk], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            fail(nonfinite_keys_message(source, lo + int(np.argmin(finite))))
        target.add(block)
        if progress is not None:
            progress(block.shape[0])
    if target is not index:  # pragma: no cover
        index = faiss.index_gpu_to_cpu(target)
    return index


# file-system faults FAISS reports inside a RuntimeError's text, as the OSError they are
_WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOENT, errno.ENOTDIR)


def write_index(index, path: Path) -> None:
    """``faiss.write_index``; a full disk (or another file-system fault) is raised as the OSError it is.

    FAISS reports write errors as a RuntimeError with strerror's text in it; callers turn OSErrors
    into one line (:func:`trime.errors.file_faults_as_errors`).
    """
    faiss = import_faiss()
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as e:
        for code in _WRITE_FAULTS:
            if os.strerror(code) in str(e):
                raise OSError(code, os.strerror(code), str(path)) from None
        raise


def set_nprobe(index, nprobe: int, on_gpu: bool = False) -> None:
    """Set nprobe on an IVF index (CPU, or GPU/sharded with ``on_gpu``); a no-op for flat indexes."""
    faiss = import_faiss()
    if on_gpu:  # pragma: no cover - only with faiss-gpu (clones already copy nprobe from the CPU index)
        with contextlib.suppress(RuntimeError, AttributeError):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    elif _try_extract_ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))


def search_gpus(requested: str) -> list[int]:
    """GPU ids for the search index: ``auto`` = 1..n-1 with several GPUs, [0] with one, none on CPU."""
    n = num_gpus()
    if requested == "none" or n == 0:
        return []
    if requested == "all":
        return list(range(n))
    return list(range(1, n)) if n > 1 else [0]


def to_search_device(index, gpus: list[int], log: Callable[[str], None] = print):
    """Clone a CPU index onto ``gpus`` (sharded, fp16 lookup tables); returns it unchanged if none."""
    if not gpus:
        return index
    faiss = import_faiss()
    try:  # pragma: no cover - only with faiss-gpu
        co = faiss.GpuMultipleClonerOptions()
        co.shard = True
        co.useFloat16 = True
        if len(gpus) == 1:
            single = faiss.GpuClonerOptions()
            single.useFloat16 = True
            return faiss.index_cpu_to_gpu(_gpu_resources(1)[0], gpus[0], index, single)
        return faiss.index_cpu_to_gpus_list(index, co=co, gpus=gpus)
    except (RuntimeError, AttributeError) as e:  # pragma: no cover
        log(f"trime: warning: could not move the FAISS index to GPUs {gpus} ({e}); searching on the CPU")
        return index


def search(index, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(similarity scores, ids) of the top-k; similarity = inner product or -squared L2 distance."""
    dist, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    scores = dist if metric == "ip" else -dist
    return scores, ids
