"""The dense brute-force TRIME reference shared by the loss, criterion and long/ext tests.

Visibility is an explicit python-loop N x M matrix and the NLL explicit float64 sums: the spec
written as plainly as possible, independent of trime.loss's blockwise code.
"""

import torch


def dense_visibility(
    rule, seg_q, pos_q, seg_k, pos_k, valid_q, valid_k, external_local=True, group_q=None, group_k=None
):
    """Explicit python-loop visibility matrix: the spec, written as plainly as possible."""
    n, m = len(seg_q), len(seg_k)
    vis = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):
        for j in range(m):
            if not (valid_q[i] and valid_k[j]):
                continue
            if group_q is not None and group_q[i] != group_k[j]:
                continue
            same, earlier = seg_q[i] == seg_k[j], pos_k[j] < pos_q[i]
            if rule == "local":
                vis[i, j] = same and earlier
            elif rule == "long":
                vis[i, j] = earlier
            else:
                vis[i, j] = (not same) or (external_local and earlier)
    return vis


def dense_nll(queries, keys, key_labels, targets, token_score, token_logz, vis, scale, valid_q):
    """-log((Z_t p(y) + sum_pos e^s) / (Z_t + sum_vis e^s)) with explicit sums in float64."""
    s = (queries.double() @ keys.double().T) * scale
    out = []
    for i in range(len(targets)):
        if not valid_q[i]:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        e = s[i].exp()
        num = token_score[i].double().exp() + (e * (vis[i] & (key_labels == targets[i]))).sum()
        den = token_logz[i].double().exp() + (e * vis[i]).sum()
        out.append(-(num / den).log())
    return torch.stack(out)
