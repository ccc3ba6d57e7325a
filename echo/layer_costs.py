"""Which layers can share, measured one-shot on a model that shares nothing (tools/analyze.py layers reports it):
what each pair costs (layer j reading layer i's K/V or reusing its attention, nothing trained), how alike the
layers' K/V and attention maps are, and the sources with the least summed cost for a number of consumers."""
import itertools
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import UsageError, projection_sources


def pairing(model, i, j, kind="kv"):
    """Whose q, k, v layer j would attend with if it read layer i's K/V (kind "kv") or attention ("att": rotated
    q and k), by the model's own rule; the model is not converted: handed these (LLaMA.layer_step's `reads`),
    layer j uses layer i's tensors exactly as layer i computes them now, and its own projections sit idle."""
    sources = {"kv": list(model.kv_sources), "att": list(model.att_sources)}
    sources[kind][j] = i
    return projection_sources(sources["kv"], sources["att"], j)


@torch.no_grad()
def mean_loss(model, batches):
    return sum(model(x, y)[1].item() for x, y in batches) / len(batches)


@torch.no_grad()
def layer_similarities(model, batches):
    """(K/V similarity, attention similarity), each (L, L): the mean cosine of layers' K and V vectors per
    head and position, and EchoAtt's view, the mean cosine of their causal attention maps per head."""
    captured = {}

    def hook(i):
        def record(module, args, output):
            q, k, v, _ = output[1]                             # (B, H, T, hd), (B, KVH, T, hd) x 2
            G = q.size(1) // k.size(1)
            scores = q @ k.repeat_interleave(G, 1).transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, T)
            T = q.size(2)
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            captured.setdefault(i, []).append((k, v, att))
        return record

    handles = [layer.attention.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    L = len(model.layers)
    kv_sim, att_sim = np.eye(L), np.eye(L)
    cos = torch.nn.functional.cosine_similarity
    for i, j in itertools.combinations(range(L), 2):
        pairs = list(zip(captured[i], captured[j]))
        kv_sim[i, j] = kv_sim[j, i] = np.mean([(cos(a[0], b[0], dim=-1).mean() + cos(a[1], b[1], dim=-1).mean()).item() / 2
                                               for a, b in pairs])
        att_sim[i, j] = att_sim[j, i] = np.mean([cos(a[2].flatten(-2), b[2].flatten(-2), dim=-1).mean().item()
                                                 for a, b in pairs])
    return kv_sim, att_sim


@torch.no_grad()
def plain_pass(model, idx):
    """One pass of the unchanged model: the residual stream entering each layer, and the (q, k, v) each layer
    attended with (what a layer above may read)."""
    rope = model.rope_cos[:idx.size(1)], model.rope_sin[:idx.size(1)]
    x, inputs, seen = model.tok_embeddings(idx), [], []
    for i in range(len(model.layers)):
        inputs.append(x)
        x = model.layer_step(i, x, seen, rope=rope)
    return inputs, seen


@torch.no_grad()
def loss_from(model, j, x, seen, targets, reads):
    """The loss of a pass that starts at layer j with residual stream x, the layers below j having attended
    with seen, and layer j attending with the layers `reads` names: nothing below it needs to run again."""
    rope = model.rope_cos[:x.size(1)], model.rope_sin[:x.size(1)]
    seen = list(seen)
    for i in range(j, len(model.layers)):
        x = model.layer_step(i, x, seen, rope=rope, reads=reads if i == j else None)
    logits = model.output(model.norm(x)).float()                                  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).item()


def share_costs(model, batches, kind="kv"):
    """(L, L) matrix: cost[i, j] (i < j) is the rise in loss when layer j reads layer i's K/V (kind "kv") or
    attention ("att") instead of computing its own, nothing else changed, no training. The diagonal and below
    are 0. Also returns the base loss. A pair (i, j) changes nothing below layer j, so one plain pass per
    batch records what enters each layer, and each pair runs only layers j and up: at 30 layers a pair costs
    about half a whole pass (a third of the layers; the LM head runs every time)."""
    L = len(model.layers)
    states = [(plain_pass(model, x), y) for x, y in batches]
    base = mean_loss(model, batches)
    pairs = list(itertools.combinations(range(L), 2))
    cost = np.zeros((L, L))
    bar = tqdm(pairs, unit="pair", desc=f"{kind} pair costs", leave=False) if sys.stderr.isatty() else pairs
    for i, j in bar:
        reads = pairing(model, i, j, kind)
        loss = sum(loss_from(model, j, inputs[j], seen[:j], y, reads) for (inputs, seen), y in states) / len(states)
        cost[i, j] = loss - base
    return cost, base


def sources_for(cost, own):
    """Every layer not in `own` (the layers that stay their own source) reads the one at or below it that costs
    it least."""
    return [i if i in own else min((p for p in own if p < i), key=lambda p: cost[p, i])
            for i in range(len(cost))]


def summed_cost(cost, sources):
    return sum(cost[s, i] for i, s in enumerate(sources) if s != i)


def choose_sources(cost, n_sources, exact_up_to=3_000_000):
    """Sources (for K/V or attention, as the cost matrix is) with n_sources layers that stay their own source
    (layer 0 among them) minimising the summed pairwise cost. Exact when there are at most `exact_up_to` source
    sets (C(L-1, n_sources-1); 30 layers with 23 sources: 1.6M, a few seconds): every set is tried, vectorised
    over sets. Beyond that, greedy: add, one at a time, the source that lowers the summed cost most.
    Returns (sources, exact)."""
    L = len(cost)
    if not 1 <= n_sources <= L:
        raise UsageError(f"n_sources={n_sources}: expected 1 to n_layer={L}")
    if math.comb(L - 1, n_sources - 1) > exact_up_to:
        own = {0}
        while len(own) < n_sources:
            best = min(set(range(L)) - own, key=lambda p: summed_cost(cost, sources_for(cost, own | {p})))
            own.add(best)
        return sources_for(cost, own), False
    best, best_total = None, float("inf")
    combos = itertools.combinations(range(1, L), n_sources - 1)
    while True:
        sets = list(itertools.islice(combos, 100_000))  # the other sources, n_sources - 1 of them a set
        if not sets:
            break
        chunk = np.array(sets, dtype=np.int64).reshape(len(sets), n_sources - 1)
        is_source = np.zeros((len(chunk), L), dtype=bool)
        is_source[:, 0] = True
        np.put_along_axis(is_source, chunk, True, axis=1)
        total = np.zeros(len(chunk))
        for j in range(1, L):  # a consumer j pays its cheapest source below it
            below = np.where(is_source[:, :j], cost[:j, j][None, :], np.inf).min(axis=1)
            total += np.where(is_source[:, j], 0.0, below)
        k = int(total.argmin())
        if total[k] < best_total:
            best, best_total = {0, *chunk[k].tolist()}, total[k]
    return sources_for(cost, best), True


def cla_like(n_layer, n_sources):
    """cla:G if some G gives exactly n_sources groups, else the nearest CLA-like spec: groups of
    adjacent layers as even as possible, the bottom layer of each the source. (spec, description)."""
    for g in range(1, n_layer + 1):
        if math.ceil(n_layer / g) == n_sources:
            return f"cla:{g}", f"cla:{g}"
    starts = sorted({round(k * n_layer / n_sources) for k in range(n_sources)})
    sources = [max(s for s in starts if s <= i) for i in range(n_layer)]
    spec = ",".join(map(str, sources))
    return spec, f"CLA-like {spec}"
