"""Study: where TrimeLM_ext's in-training "external" memory comes from, and where its datastore gain goes.

TrimeLM_ext (``trime_ext_loss``) trains with a memory of all tokens of the *other* segments
of its batch; ``trime-bm25-batches`` fills each batch with BM25-similar segments. If those
segments are mostly from the query's own article, the in-training external memory teaches
what long memory teaches (copying from the same document) and little about using other
documents, which is what the datastore at evaluation offers.

Measured, for batches of ``--segments-per-batch`` segments chunked from three orders of the
training segments (the BM25 plan, the corpus order of ``--keep-order`` / TrimeLM_long, and
random orders = chance):

- ``token_same_article``: for every training token, the fraction of its in-batch external
  memory (the tokens of the batch's other segments) that comes from the token's own article,
  averaged over tokens (exact, from per-batch article counts);
- ``pair_same_article``: the fraction of (segment, other in-batch segment) pairs whose
  majority articles agree; ``segments_with_same_article_neighbour``: segments with at least
  one such neighbour;
- ``pair_corpus_adjacent``: pairs that are neighbours in corpus order (ids differ by 1).

On the real WikiText-2 (``--data-bin``, from ``trime-prepare wikitext-2``; articles start
at the `` = Title = `` lines) with the plan ``python -m bench.reproduce`` uses (``--plan``, made by
``trime-bm25-batches --tokens-per-sample 256 --lucene``), and on the planted-topic corpus of
``tests/test_bm25_batches.py`` (8 topics with disjoint vocabularies, 40 segments each;
"article" = topic) as a check that the measure sees topical grouping.

Writes ``bench/results/ext-diagnosis.json``; the write-up is ``bench/results/ext-diagnosis.md``.
Usage: ``.venv/bin/python -m bench.studies.ext_diagnosis --data-bin DIR --plan PLAN.json`` (about a minute).

Where the gain goes (``--gain --path CKPT --datastore DIR``; section ``gain.LABEL``): TrimeLM_ext's test ppl
with the datastore in the joint softmax only (``--lmbda 0``), by kNN-LM interpolation only (``--memory long
--knnlm``) and both, at each ``--ks``, each tuned on a valid prefix and with a ``--sweep`` curve (png).

Index quality (``--path CKPT --datastore DIR`` instead of ``--plan``; section ``index_quality.LABEL``):
recall@k of the datastore's IVF-PQ index against exact search over the same keys for the eval-time keys
of ``--max-batches`` x 16 valid windows, the PQ score error against the spread of the exact top-k scores,
key norms and best scores of the datastore vs local memory, and ``trime-eval --memory external --tune``'s
test ppl with PQ scores and with ``--knn-exact`` (two tuned evaluations: the slow part).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.common import machine_info, today
from trime.io_utils import write_json_atomic

REPO = Path(__file__).resolve().parents[2]

RANDOM_SEEDS = (1, 2, 3, 4, 5)


def article_of_items(data_bin: Path) -> tuple[np.ndarray, np.ndarray]:
    """(article id, size in tokens incl. </s>) of every line of the train split, in fairseq's order.

    An article starts at a `` = Title = `` line (one ``=`` each side; section headings have two or more).
    Lines before the first title belong to article 0.
    """
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(data_bin / "train"), dictionary)
    equals = dictionary.index("=")
    sizes = np.asarray(dataset.sizes, dtype=np.int64)
    article = np.zeros(len(dataset), dtype=np.int64)
    current = 0
    for i in range(len(dataset)):
        toks = dataset[i].tolist()[:-1]  # drop </s>
        if len(toks) >= 3 and toks[0] == equals and toks[-1] == equals and toks[1] != equals and toks[-2] != equals:
            current += 1
        article[i] = current
    return article, sizes


def segment_articles(article_per_item: np.ndarray, sizes: np.ndarray, tokens_per_sample: int) -> list[np.ndarray]:
    """Article id of each token of each segment of ``--sample-break-mode none`` blocking."""
    stream = np.repeat(article_per_item, sizes)
    return [stream[i : i + tokens_per_sample] for i in range(0, len(stream), tokens_per_sample)]


def batch_statistics(order: np.ndarray, seg_articles: list[np.ndarray], per_batch: int) -> dict:
    """Same-article statistics of the in-batch memory for batches chunked from ``order``."""
    majority = np.array([np.bincount(a).argmax() for a in seg_articles])
    tok_num = tok_den = 0.0
    pairs = same_pairs = adjacent_pairs = 0
    with_neighbour = counted_segments = 0
    for start in range(0, len(order), per_batch):
        batch = order[start : start + per_batch]
        if len(batch) < 2:
            continue
        arts = [seg_articles[s] for s in batch]
        all_arts = np.concatenate(arts)
        uniq, counts = np.unique(all_arts, return_counts=True)
        batch_count = dict(zip(uniq.tolist(), counts.tolist()))
        total = len(all_arts)
        for a in arts:
            u, c = np.unique(a, return_counts=True)
            others = total - len(a)
            same = np.array([batch_count[x] for x in u.tolist()]) - c  # same-article tokens in other segments
            tok_num += float(np.sum(c * same / others))
            tok_den += len(a)
        maj = majority[batch]
        eq = maj[:, None] == maj[None, :]
        np.fill_diagonal(eq, False)
        adj = np.abs(batch[:, None] - batch[None, :]) == 1
        n = len(batch)
        pairs += n * (n - 1)
        same_pairs += int(eq.sum())
        adjacent_pairs += int(adj.sum())
        with_neighbour += int(eq.any(axis=1).sum())
        counted_segments += n
    return {
        "token_same_article": tok_num / tok_den,
        "pair_same_article": same_pairs / pairs,
        "segments_with_same_article_neighbour": with_neighbour / counted_segments,
        "pair_corpus_adjacent": adjacent_pairs / pairs,
    }


def compare_orders(plan: np.ndarray, seg_articles: list[np.ndarray], per_batch: int) -> dict:
    n = len(seg_articles)
    rows = {
        "bm25_plan": batch_statistics(plan, seg_articles, per_batch),
        "consecutive": batch_statistics(np.arange(n), seg_articles, per_batch),
    }
    randoms = [batch_statistics(np.random.default_rng(s).permutation(n), seg_articles, per_batch) for s in RANDOM_SEEDS]
    rows["random"] = {k: float(np.mean([r[k] for r in randoms])) for k in randoms[0]}
    rows["random"]["seeds"] = list(RANDOM_SEEDS)
    return rows


def wikitext2(data_bin: Path, plan_path: Path, per_batch: int) -> dict:
    from trime.retrieval.bm25_batches import load_batch_plan

    plan, meta = load_batch_plan(plan_path)
    tps = int(meta["tokens_per_sample"])
    article, sizes = article_of_items(data_bin)
    segs = segment_articles(article, sizes, tps)
    if len(segs) != len(plan):
        raise SystemExit(f"ext_diagnosis: {plan_path} lists {len(plan)} segments, the data-bin makes {len(segs)}")
    arts_per_seg = np.array([len(np.unique(a)) for a in segs])
    article_tokens = np.bincount(np.repeat(article, sizes))
    return {
        "data_bin": str(data_bin),
        "plan": str(plan_path),
        "plan_meta": {k: meta.get(k) for k in ("tokens_per_sample", "k", "k1", "b", "idf", "followed_fraction")},
        "segments": len(segs),
        "articles": int(article.max()) + 1,
        "article_tokens_median": float(np.median(article_tokens)),
        "article_segments_median": float(np.median(article_tokens) / tps),
        "segments_spanning_two_or_more_articles": float(np.mean(arts_per_seg > 1)),
        "segments_per_batch": per_batch,
        "orders": compare_orders(plan, segs, per_batch),
    }


def planted(per_batch: int) -> dict:
    from trime.retrieval.bm25 import LUCENE_PRESET, planted_topic_segments
    from trime.retrieval.bm25_batches import DEFAULT_K, greedy_chain, search_all

    segments, topic = planted_topic_segments()
    ids, _ = search_all(segments, LUCENE_PRESET, k=DEFAULT_K)
    order, followed = greedy_chain(ids, seed=1)
    segs = [np.full(len(segments[i]), topic[i]) for i in range(len(segments))]
    orders = compare_orders(order, segs, per_batch)
    orders.pop("consecutive")  # ids are a random permutation of the topics: corpus order is random
    return {"segments": len(segments), "topics": int(topic.max()) + 1, "followed_fraction": followed,
            "segments_per_batch": per_batch, "orders": orders}  # fmt: skip


def _summary(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std()), "p5": float(np.percentile(x, 5)),
            "p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95))}  # fmt: skip


def eval_queries(lm, context: int, split: str, max_batches: int):
    """Eval-time keys of the scored tokens of ``split`` (what local/long memory holds), and their local scores."""
    import torch

    from trime.eval.engine import Evaluator

    cached = Evaluator(lm, lm.window_settings(context, None), batch_size=16, progress=False).collect(split, max_batches)
    queries, local_top = [], []
    for batch in cached.batches:
        queries.append(batch.queries.float())
        reps = batch.reps.float()
        for b in range(len(batch.starts)):
            rows = torch.nonzero(batch.scored[b]).flatten()
            scores = reps[b, rows] @ reps[b].T  # (scored, T): local memory = earlier positions of the window
            allowed = (torch.arange(reps.shape[1])[None, :] < rows[:, None]) & batch.key_valid[b][None, :]
            scores = scores.masked_fill(~allowed, float("-inf"))
            local_top.append(scores.max(dim=1).values)
    local_top = torch.cat(local_top)
    return torch.cat(queries).numpy(), local_top[torch.isfinite(local_top)].numpy()


def long_memory_scores(queries: np.ndarray, mem_size: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top-1, mean of top-k) inner product of each query with the ``mem_size`` queries before it (the FIFO
    of long-term memory over a consecutive stream), for the queries that have a full FIFO."""
    import torch

    q = torch.from_numpy(queries).float()
    top1, topk = [], []
    for start in range(mem_size, len(q), 256):
        rows = q[start : start + 256]
        keys = q[start - mem_size : start + len(rows) - 1]
        scores = rows @ keys.T  # row r sees keys r .. r + mem_size - 1 (its own FIFO)
        offset = torch.arange(len(rows))[:, None]
        col = torch.arange(keys.shape[0])[None, :]
        scores = scores.masked_fill((col < offset) | (col >= offset + mem_size), float("-inf"))
        best = scores.topk(k, dim=1).values
        top1.append(best[:, 0])
        topk.append(best.mean(dim=1))
    return torch.cat(top1).numpy(), torch.cat(topk).numpy()


def index_quality(args) -> dict:
    """Recall@k of the datastore's IVF-PQ index vs exact search, PQ score error, key statistics, ppl exact vs PQ."""
    import subprocess

    from trime.adapters import load_adapter
    from trime.retrieval.datastore import Datastore

    lm = load_adapter(args.path, args.data_bin, cpu=True)
    queries, local_top = eval_queries(lm, args.context_window, "valid", args.max_batches)
    pq = Datastore.open(args.datastore, dim=lm.dim, dict_sha256=lm.dict_sha256, nprobe=args.nprobe)
    exact = Datastore.open(args.datastore, dim=lm.dim, dict_sha256=lm.dict_sha256, search="torch", need_index=False)
    hits_pq = pq.search(queries, args.k)
    hits_pq_exact = pq.search(queries, args.k, exact=True)  # the same neighbours, exact scores
    hits_exact = exact.search(queries, args.k, exact=True)
    # recall@k: the share of the exact top-k the index returns (ids compared through a second search with ids)
    from trime.retrieval import faiss_index

    _, ids_pq = faiss_index.search(pq.index, queries, args.k, pq.metric)
    _, ids_exact = exact.torch_search.search(queries, args.k)
    ids_exact = ids_exact.numpy()
    recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(ids_pq, ids_exact)])
    top1 = np.mean([b[0] in set(a.tolist()) for a, b in zip(ids_pq, ids_exact)])
    error = (hits_pq.scores - hits_pq_exact.scores).numpy()
    spread = hits_exact.scores.numpy().std(axis=1)  # spread of the memory logits over the top-k, per query
    keys = np.asarray(pq.keys[:: max(1, pq.count // 200_000)], dtype=np.float32)
    long_top1, long_topk = long_memory_scores(queries, args.mem_size, args.k)
    out = {
        "datastore": str(args.datastore), "index": pq.meta.get("index"), "count": pq.count, "dim": pq.dim,
        "queries": len(queries), "k": args.k, "nprobe": args.nprobe,
        "recall_at_k": float(recall), "exact_top1_in_index_top_k": float(top1),
        "pq_score_abs_error": _summary(np.abs(error)), "exact_topk_score_std_per_query": _summary(spread),
        "topk_score_exact": _summary(hits_exact.scores.numpy()[:, 0]),
        "datastore_top1_score": _summary(hits_exact.scores.numpy()[:, 0]),
        "datastore_topk_mean_score": _summary(hits_exact.scores.numpy().mean(axis=1)),
        "long_memory_top1_score": _summary(long_top1),
        "long_memory_topk_mean_score": _summary(long_topk),
        "local_memory_top1_score": _summary(local_top),
        "datastore_key_norm": _summary(np.linalg.norm(keys, axis=1)),
        "eval_key_norm": _summary(np.linalg.norm(queries, axis=1)),
    }  # fmt: skip
    ppl = {}
    for name, extra in (("pq", []), ("exact", ["--knn-exact"])):
        record = Path(args.out).with_name(f".ext-diagnosis-{name}.json")
        cmd = [str(Path(sys.executable).parent / "trime-eval"), str(args.data_bin), "--path", str(args.path),
               "--memory", "external", "--mem-size", str(args.mem_size), "--datastore", str(args.datastore),
               "--k", str(args.k), "--nprobe", str(args.nprobe), "--context-window", str(args.context_window),
               "--tune", "--tune-tokens", str(args.tune_tokens), "--cpu", "--no-progress-bar",
               "--results-json", str(record), *extra, *cache_args(args)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        rec = json.loads(record.read_text())
        record.unlink()
        test = [r for r in rec["results"] if r["subset"] == "test"][0]
        ppl[name] = {"test_ppl": test["ppl"], "tuned": (rec.get("tuning") or {}).get("chosen")}
    out["ppl_external"] = ppl
    return out


def cache_args(args) -> list:
    return ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []


LAMBDA_SWEEP = "0,0.02,0.05,0.1,0.2,0.3,0.5"
EXTERNAL_TEMP_SWEEP = "0.5,1,1.5,2,3,4,6,8"


def gain_modes(args, datastore: Path) -> dict:
    """trime-eval flags and the curve (``--sweep``) of each way of using the datastore."""
    long = ["--memory", "long", "--mem-size", str(args.mem_size)]
    ext = ["--memory", "external", "--mem-size", str(args.mem_size), "--datastore", str(datastore)]
    return {
        "none (local + long)": (long, None),
        "joint softmax only": (ext + ["--lmbda", "0"], f"external-temp={EXTERNAL_TEMP_SWEEP}"),
        "interpolation only": (long + ["--knnlm", "--datastore", str(datastore)], f"lmbda={LAMBDA_SWEEP}"),
        "joint + interpolation": (ext, f"lmbda={LAMBDA_SWEEP}"),
    }


MODE_TAGS = {"none (local + long)": "none", "joint softmax only": "joint-only",
             "interpolation only": "interp-only", "joint + interpolation": "both"}  # fmt: skip


def plot_gain(section: dict, png: Path) -> None:
    """One figure of every --gain curve: the external-temp sweep (joint only) and the lambda sweeps, per k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trime.io_utils import atomic_path

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 3.8))
    baseline = next(r["test_ppl"] for r in section["rows"] if r["k"] is None)
    for ax in (ax_t, ax_l):
        ax.axhline(baseline, color="#999", linestyle="--", label="no datastore (local + long)")
    for row in section["rows"]:
        if not row.get("sweep"):
            continue
        xs, ys = zip(*row["sweep"]["points"])
        ax = ax_t if row["sweep"]["parameter"] == "external-temp" else ax_l
        ax.plot(xs, ys, marker="o", label=f"{row['mode']}, k={row['k']}")
    ax_t.set_xlabel("external-temp (joint softmax only; tuned softmax-temp)")
    ax_l.set_xlabel("lambda (kNN-LM interpolation weight; other knobs tuned)")
    for ax in (ax_t, ax_l):
        ax.set_ylabel("test ppl")
        ax.set_ylim(min(min(y for _, y in r["sweep"]["points"]) for r in section["rows"] if r.get("sweep")) * 0.97,
                    baseline * 1.12)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("TrimeLM_ext: where the datastore's gain goes (WikiText-2 test)")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def where_gain_goes(args) -> dict:
    """Test ppl of TrimeLM_ext with the datastore in the joint softmax only, by interpolation only, and both,
    at each ``--ks``, tuned on a valid prefix, each with a ``--sweep`` curve (json + png)."""
    import subprocess

    out: dict = {"path": str(args.path), "datastore": str(args.datastore), "mem_size": args.mem_size,
                 "context_window": args.context_window, "nprobe": args.nprobe, "tune_tokens": args.tune_tokens,
                 "rows": []}  # fmt: skip
    figures = Path(args.out).parent
    for k in args.ks:
        for mode, (flags, sweep) in gain_modes(args, args.datastore).items():
            if sweep is None and k != args.ks[0]:
                continue  # no datastore: the same at every k
            tag = f"ext-gain-{args.label}-k{k}-{MODE_TAGS[mode]}"
            record = figures / f".{tag}.json"
            cmd = [str(Path(sys.executable).parent / "trime-eval"), str(args.data_bin), "--path", str(args.path),
                   *flags, "--context-window", str(args.context_window), "--tune", "--tune-tokens",
                   str(args.tune_tokens), "--cpu", "--no-progress-bar", "--results-json", str(record),
                   *cache_args(args)]  # fmt: skip
            if "--datastore" in flags:
                cmd += ["--k", str(k), "--nprobe", str(args.nprobe)]
            if sweep:
                cmd += ["--sweep", sweep, "--sweep-prefix", str(figures / tag)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"ext_diagnosis: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            rec = json.loads(record.read_text())
            record.unlink()
            test = [r for r in rec["results"] if r["subset"] == "test"][-1]
            row = {"mode": mode, "k": k if "--datastore" in flags else None, "test_ppl": test["ppl"],
                   "tuned": (rec.get("tuning") or {}).get("chosen"),
                   "sweep": None if rec.get("sweep") is None else {
                       "parameter": rec["sweep"]["parameter"],
                       "points": [(p["value"], p["ppl"]) for p in rec["sweep"]["points"]],
                       "png": f"{tag}.png"}}  # fmt: skip
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            (figures / f"{tag}.json").unlink(missing_ok=True)  # the curve is in the section; one figure below
            (figures / f"{tag}.png").unlink(missing_ok=True)
    plot_gain(out, figures / f"ext-gain-{args.label}.png")
    return out


def alignment(args) -> dict:
    """Self-retrieval on ``--path``'s valid split (as tests/test_alignment.py, on a real model): a Flat L2 datastore
    of the split, then trime-eval of the same split with kNN-LM at lambda 0.999 and interp-temp 1e-3, exact."""
    import subprocess
    import tempfile

    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as tmp:
        store = Path(tmp) / "valid-store"
        subprocess.run([str(bin_dir / "trime-build-datastore"), str(args.data_bin), "--path", str(args.path),
                        "--output", str(store), "--gen-subset", "valid", "--context-window", str(args.context_window),
                        "--index-factory", "Flat", "--metric", "l2", "--cpu", "--no-progress-bar"],
                       check=True, capture_output=True)  # fmt: skip
        record = Path(tmp) / "r.json"
        subprocess.run([str(bin_dir / "trime-eval"), str(args.data_bin), "--path", str(args.path), "--gen-subset",
                        "valid", "--context-window", str(args.context_window), "--memory", "none", "--knnlm",
                        "--datastore", str(store), "--k", "8", "--lmbda", "0.999", "--interp-temp", "1e-3",
                        "--knn-search", "torch", "--cpu", "--no-progress-bar", "--results-json", str(record)],
                       check=True, capture_output=True)  # fmt: skip
        row = json.loads(record.read_text())["results"][-1]
    return {"path": str(args.path), "split": "valid", "context_window": args.context_window,
            "tokens": row["tokens"], "ppl": row["ppl"], "aligned_ppl_below": 1.01}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-bin", type=Path, required=True, help="trime-prepare wikitext-2 data-bin")
    parser.add_argument("--plan", type=Path, help="trime-bm25-batches plan of that data-bin (training memory)")
    parser.add_argument("--segments-per-batch", type=int, default=16, help="as make reproduce (16 x 256)")
    parser.add_argument(
        "--extra-plan",
        nargs=2,
        action="append",
        default=[],
        metavar=("PLAN", "SEGMENTS_PER_BATCH"),
        help="another plan of the same data-bin (e.g. longer segments) and its batch size; repeatable",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ext-diagnosis.json")
    index = parser.add_argument_group("index quality (instead of --plan): a TrimeLM_ext checkpoint and its datastore")
    index.add_argument("--path", type=Path, help="checkpoint")
    index.add_argument("--datastore", type=Path, help="its trime-build-datastore directory (IVF-PQ index)")
    index.add_argument("--label", default="quick", help="name of this section in the json (e.g. quick, full)")
    index.add_argument("--k", type=int, default=64)
    index.add_argument("--nprobe", type=int, default=32)
    index.add_argument("--mem-size", type=int, default=512)
    index.add_argument("--context-window", type=int, default=32)
    index.add_argument("--max-batches", type=int, default=8, help="valid batches of 16 windows used as queries")
    index.add_argument("--tune-tokens", type=int, default=50000, help="trime-eval --tune-tokens (as make reproduce)")
    index.add_argument("--cache-dir", type=Path, default=None, help="trime-eval --cache-dir (reuse make reproduce's)")
    index.add_argument(
        "--gain",
        action="store_true",
        help="instead of index quality: where the gain goes (joint only / interpolation only / both, at --ks)",
    )
    index.add_argument("--ks", type=int, nargs="+", default=[256, 1024], help="k of the --gain evaluations")
    index.add_argument("--alignment", action="store_true", help="instead of index quality: self-retrieval of valid")
    index.add_argument("--render-gain", action="store_true", help="only redraw ext-gain-LABEL.png from --out")
    args = parser.parse_args()
    if args.render_gain:
        plot_gain(json.loads(args.out.read_text())["gain"][args.label], args.out.parent / f"ext-gain-{args.label}.png")
        return
    if args.plan is None and args.alignment:
        if args.path is None:
            parser.error("--alignment needs --path")
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        old.setdefault("alignment_real", {})[args.label] = {"date": today(), **alignment(args)}
        write_json_atomic(args.out, old)
        print(json.dumps(old["alignment_real"][args.label]))
        return
    if args.plan is None and args.gain:
        if args.path is None or args.datastore is None:
            parser.error("--gain needs --path and --datastore")
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        old.setdefault("gain", {})[args.label] = {"date": today(), **where_gain_goes(args)}
        write_json_atomic(args.out, old)
        return
    if args.plan is None:
        if args.path is None or args.datastore is None:
            parser.error("give --plan (training memory) or --path and --datastore (index quality)")
        old = json.loads(args.out.read_text()) if args.out.exists() else {}
        old.setdefault("index_quality", {})[args.label] = {"date": today(), **index_quality(args)}
        write_json_atomic(args.out, old)
        print(json.dumps(old["index_quality"][args.label], indent=1))
        return
    result = {
        "machine": machine_info(),
        "date": today(),
        "partial": "training-memory section only; the alignment and index-quality sections come from other runs",
        "training_memory": {
            "wikitext2": wikitext2(args.data_bin, args.plan, args.segments_per_batch),
            "wikitext2_other_segment_lengths": [
                wikitext2(args.data_bin, Path(plan), int(per_batch)) for plan, per_batch in args.extra_plan
            ],
            "planted_topics": planted(args.segments_per_batch),
        },
    }
    if args.out.exists():  # keep the other sections (alignment, index quality) written by other runs
        old = json.loads(args.out.read_text())
        result = {**old, **result}
    write_json_atomic(args.out, result)
    print(json.dumps(result["training_memory"], indent=1))


if __name__ == "__main__":
    main()
