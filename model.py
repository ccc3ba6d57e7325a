"""ECHO-LLaMA in one file: a LLaMA whose layers can share K/V across layers.

The words, used everywhere in this project: a *consumer* is a layer that attends with projections another layer
computed; the layer it reads them from is its *source* (a layer that computes its own is its own source).
A *K/V consumer* (ECHO, `kv_sources`) keeps its own queries and output projection but attends to the rotated
keys and values of a lower layer, its *producer*: it has no wk/wv weights and no KV-cache slot. An *attention
consumer* (EchoAtt, `att_sources`) reuses a lower layer's attention pattern softmax(q_j k_j^T), i.e. that
layer's rotated queries and keys, with its own values: no wq/wk, no K slot, but wv and a V slot. Which layer's
q, k and v each layer attends with is one rule, `projection_sources`; weights, cache slots, the conversion and
the cost counts all follow from it.

Parts, top to bottom: config + sharing specs and the rule, LLaMA pieces (RMSNorm, RoPE, attention, SwiGLU),
the layer-aware KV cache, the model. The rest (costs, conversion, generation, files) is the library echo/.
"""
import math
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class UsageError(ValueError):
    """Bad input from a user (config, spec, checkpoint, prompt). The scripts print it as one line."""


# ----------------------------------------------------------------------------------------------------
# Configuration and the sharing specs

@dataclass
class ModelConfig:
    vocab_size: int = 32000
    block_size: int = 256          # context window: RoPE tables and the KV cache are sized from it
    n_layer: int = 6
    n_head: int = 6                # query heads
    n_kv_head: int = 2             # key/value heads (GQA); 1 = multi-query, n_head = multi-head
    n_embd: int = 384
    intermediate_size: int = 0     # SwiGLU width; 0 = LLaMA's rule, 8/3 * n_embd rounded up to 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True    # LM head shares the token-embedding matrix
    dropout: float = 0.0
    kv_share: str = "none"         # which layers read another layer's K/V: see resolve_sources
    att_share: str = "none"        # which layers reuse another layer's attention (q and k): same grammar

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.intermediate_size < 0 or not self.rope_theta > 0 or not self.norm_eps > 0:
            raise UsageError(f"intermediate_size={self.intermediate_size}, rope_theta={self.rope_theta}, "
                             f"norm_eps={self.norm_eps}: expected >= 0, > 0 and > 0")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"dropout={self.dropout}: expected 0 <= dropout < 1")
        if self.n_embd % self.n_head:
            raise UsageError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise UsageError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise UsageError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.intermediate_size:
            self.intermediate_size = 32 * math.ceil(8 * self.n_embd / 3 / 32)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

def resolve_sources(spec, n_layer, name="kv_share"):
    """Turn a kv_share (or att_share) spec into sources: entry i = the layer whose K/V (attention) layer i
    reads; a layer that is its own source computes its own.

      "none"     every layer is its own source                   none   -> [0, 1, 2, 3, 4, 5]
      "echo:N"   the top N layers read layer n_layer-N-1          echo:2 -> [0, 1, 2, 3, 3, 3]
      "cla:G"    groups of G adjacent layers read the bottom one  cla:2  -> [0, 0, 2, 2, 4, 4]
                 (G need not divide n_layer: the top group is smaller)  cla:4  -> [0, 0, 0, 0, 4, 4]
      "0,0,2,2"  explicit: entry i is layer i's source (a layer at or below i that is its own source)
                                                            0,0,2,2,2,5 -> [0, 0, 2, 2, 2, 5]
    (examples for n_layer = 6; N counts consumers: on SmolLM2's 30 layers echo:7 makes layers 23-29 read 22)
    """
    spec = str(spec).strip()
    grammar = "expected 'none', 'echo:N', 'cla:G' or a comma-separated list of source layers"
    kind, _, arg = spec.partition(":")
    if spec == "none":
        return list(range(n_layer))
    if kind in ("echo", "cla"):
        if not arg.strip().isdigit():
            raise UsageError(f"{name} '{spec}': '{kind}:' needs a whole number, e.g. '{kind}:2'")
        n = int(arg)
        if kind == "echo":
            if not 1 <= n <= n_layer - 1:
                raise UsageError(f"{name} '{spec}': N must be between 1 and n_layer-1 = {n_layer - 1}")
            return list(range(n_layer - n)) + [n_layer - n - 1] * n
        if not 1 <= n <= n_layer:
            raise UsageError(f"{name} '{spec}': group size G must be between 1 and n_layer = {n_layer}")
        return [i - i % n for i in range(n_layer)]
    try:
        sources = [int(s) for s in spec.split(",")]
    except ValueError:
        raise UsageError(f"{name} '{spec}': {grammar}") from None
    if len(sources) != n_layer:
        raise UsageError(f"{name} '{spec}' lists {len(sources)} layers but the model has n_layer={n_layer}")
    for i, s in enumerate(sources):
        if not 0 <= s <= i:
            raise UsageError(f"{name} '{spec}': layer {i} reads layer {s}, but a source must be in 0..{i}")
        if sources[s] != s:
            raise UsageError(f"{name} '{spec}': layer {i} reads layer {s}, which is itself a consumer "
                             f"(of layer {sources[s]}); a source must compute its own")
    return sources


def resolve_sharing(cfg):
    """(kv_sources, att_sources) of a config, with the rules that tie the two kinds together."""
    kv = resolve_sources(cfg.kv_share, cfg.n_layer, "kv_share")
    att = resolve_sources(cfg.att_share, cfg.n_layer, "att_share")
    for i in range(cfg.n_layer):
        if kv[i] != i and att[i] != i:
            raise UsageError(f"layer {i} reads layer {kv[i]}'s K/V and layer {att[i]}'s attention: a layer "
                             f"reads from other layers at most one kind (kv_share or att_share, not both)")
        if kv[i] != i and att[kv[i]] != kv[i]:
            raise UsageError(f"layer {i} reads layer {kv[i]}'s K/V, but layer {kv[i]} reuses layer "
                             f"{att[kv[i]]}'s attention and has no keys of its own: a K/V source computes K and V")
    return kv, att


def projection_sources(kv_sources, att_sources, i):
    """THE rule: the layers whose q, k and v projections layer i attends with, {"q": .., "k": .., "v": ..}; i
    itself where it computes its own. An attention consumer takes its source's q and the keys that source
    attends with (its own, or its producer's); a K/V consumer takes its producer's k and v. Everything else
    (weights, cache slots, the attention a decode step reuses (reused_attention), conversion, costs) is derived
    from this function: change a rule here only."""
    return {"q": att_sources[i], "k": kv_sources[att_sources[i]], "v": kv_sources[i]}


def reused_attention(reads_from, i):
    """The lower layer whose softmax(q k^T) layer i reuses whole (the one attending with its own q and the keys i
    attends with), or None. Derived from the rule (reads_from): keys of its own would end the reuse here."""
    j = reads_from[i]["q"]
    return j if j != i and reads_from[j]["q"] == j and reads_from[j]["k"] == reads_from[i]["k"] else None


def computed_projections(kv_sources, att_sources):
    """Per layer, the projections it computes itself, in q, k, v order (e.g. ["q"] for a K/V consumer): those it
    is its own source for."""
    return [[p for p, src in projection_sources(kv_sources, att_sources, i).items() if src == i]
            for i in range(len(kv_sources))]


# ----------------------------------------------------------------------------------------------------
# LLaMA pieces

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in fp32 even under bf16
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_len, theta):
    """cos and sin of the rotary angles, each (max_len, head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)                # (max_len, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[..., j], x[..., j + hd/2]) by their position's angles (Hugging Face layout).
    x: (B, heads, T, hd); cos, sin: (T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)                                          # (B, h, T, hd/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


# Attended: what a layer attended with, for the layers above: rotated q (B, H, T, hd), k and v (B, KVH, S, hd), S = T
# or the cache's length, at decode probs (B, KVH, G*T, S) if reused. Given: what its sources hand it (None: its own).
Attended = namedtuple("Attended", "q k v probs")
Given = namedtuple("Given", "q k v probs", defaults=(None, None, None, None))

# How a pass runs, decided once in LLaMA.forward and handed down by name
FULL = "full"        # a causal pass over a whole sequence from position 0 (training, evaluation)
PREFILL = "prefill"  # several tokens written into the KV cache at input_pos and attending through it
DECODE = "decode"    # one new token per sequence through the cache (generation's step)


class Attention(nn.Module):
    """Grouped-query causal attention with the projections `computes` lists (computed_projections, e.g. ["q"]), in
    q, k, v order; the others it is handed (`given`); always wo. attention_reused: decode hands up its probs."""

    def __init__(self, cfg, computes, attention_reused=False):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.head_dim, cfg.dropout
        self.heads = {"q": cfg.n_head, "k": cfg.n_kv_head, "v": cfg.n_kv_head}
        self.computes, self.attention_reused = list(computes), attention_reused
        self.rows = [self.heads[p] * cfg.head_dim for p in self.computes]
        for p, rows in zip(self.computes, self.rows):
            setattr(self, f"w{p}", nn.Linear(cfg.n_embd, rows, bias=False))
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def project(self, x, given):
        """The projections it computes and is not handed (`reads` may hand it one): {"q": (B, n_head, T, hd), "k", "v":
        (B, n_kv_head, T, hd)}; in the inference layout (generate.inference_layout) rows of one matrix wqkv."""
        wanted = [p for p in self.computes if getattr(given, p) is None]
        outs = (dict(zip(self.computes, self.wqkv(x).split(self.rows, -1))) if hasattr(self, "wqkv")
                else {p: getattr(self, f"w{p}")(x) for p in wanted})
        return {p: outs[p].unflatten(-1, (self.heads[p], self.head_dim)).transpose(1, 2)  # (B, heads, T, hd)
                for p in wanted}

    def forward(self, x, *, rope, mode, mask=None, given=Given(), cache=None, slots=(None, None), input_pos=None):
        """Attend with q, k and v: each the layer's own, or the rotated one its source attended with (`given`).
        Keys and values it computes are rotated once, here, and written to its cache slots (K slot number
        slots[0], V slot slots[1]) when there is a cache. Returns (output, Attended)."""
        B, T, _ = x.shape
        cos, sin = rope

        def to_cache(which, t):  # without a cache t itself; with one, t written at input_pos and the whole slot
            return t if cache is None else cache.write(which, slots[which == "v"], input_pos, t)  # (B, KVH, S, hd)

        own = self.project(x, given)
        q = apply_rope(own["q"], cos, sin) if "q" in own else given.q
        k = to_cache("k", apply_rope(own["k"], cos, sin)) if "k" in own else given.k
        v = to_cache("v", own["v"]) if "v" in own else given.v
        probs, dropout = None, self.dropout if self.training else 0.0
        if mode == FULL and not dropout and explicit_is_faster(q.device.type, q.dtype, T):  # a CPU, bf16, short block
            y = attend_explicit(q, k, v, torch.ones(T, T, dtype=torch.bool, device=q.device).tril())[0]
        elif mode == FULL:  # from position 0: SDPA's own causal mask (flash kernel, GQA included)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, dropout_p=dropout)
        elif mode == DECODE and given.probs is not None:  # an attention consumer: its source's probabilities,
            y = mix_values(given.probs, v, self.n_head)     # no keys read, no scores
        elif mode == DECODE and self.attention_reused:  # layers above reuse it: compute the probabilities once
            y, probs = attend_explicit(q, k, v, mask)
        else:  # through the cache at an offset: an explicit (T, S) mask, since is_causal=True would mask the
            y = attend_masked(q, k, v, mask)  # top-left triangle where T new queries need the bottom rows
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)                # (B, T, H*hd)
        return F.dropout(self.wo(y), self.dropout, self.training), Attended(q, k, v, probs)


def attend_masked(q, k, v, mask):
    """Attention with an explicit mask, without ever pairing the mask with unequal head counts.
    On CUDA the flash kernel takes no mask and the memory-efficient kernel needs as many K/V heads as query
    heads, so mask + enable_gqa would silently run the slow math kernel (K/V copied to every query head).
    Instead fold each K/V head's G query heads into the query axis: the head counts then match and the
    memory-efficient kernel applies. q: (B, H, T, hd); k, v: (B, KVH, S, hd); mask: (T, S) -> (B, H, T, hd)."""
    B, H, T, hd = q.shape
    G = H // k.size(1)  # query heads per K/V head; query head h reads K/V head h // G (as enable_gqa does)
    q = q.reshape(B, k.size(1), G * T, hd)  # (B, KVH, G*T, hd): row g*T + t is query head kvh*G + g at step t
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(G, 1))  # mask rows repeated per g
    return y.reshape(B, H, T, hd)


def attend_explicit(q, k, v, mask):
    """attend_masked, with the probabilities computed explicitly and returned too: (y (B, H, T, hd), probs
    (B, KVH, G*T, S) in the folded layout, row g*T + t = query head kvh*G + g at step t). At decode they are
    small (at SmolLM2's shape 21x the keys' bytes), so a source hands them up and its attention consumers read
    no keys and compute no scores (EchoAtt's saving); training and prefill recompute instead (T x T would cost
    more traffic than it saves)."""
    B, H, T, hd = q.shape
    G = H // k.size(1)
    scores = q.reshape(B, k.size(1), G * T, hd) @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, KVH, G*T, S)
    probs = scores.float().masked_fill(~mask.repeat(G, 1), float("-inf")).softmax(-1).to(v.dtype)
    return mix_values(probs, v, H), probs


def explicit_is_faster(device_type, dtype, T):
    """Whether attend_explicit beats SDPA for a full causal pass of T positions: on a CPU in bf16 (fp16 assumed alike)
    up to 512 (CPU flash: ~2x the time forward and backward, docs/RESULTS.md); never on a GPU or in fp32."""
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) and T <= 512


def mix_values(probs, v, n_head):
    """probs (B, KVH, G*T, S) @ v (B, KVH, S, hd) -> (B, H, T, hd): each query head mixes its K/V head's values."""
    B, KVH, GT, _ = probs.shape
    return (probs @ v).reshape(B, n_head, GT * KVH // n_head, v.size(-1))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x):  # in the inference layout (generate.inference_layout) w1 and w3 are the halves of one w13
        h1, h3 = self.w13(x).chunk(2, -1) if hasattr(self, "w13") else (self.w1(x), self.w3(x))
        return F.dropout(self.w2(F.silu(h1) * h3), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg, computes, attention_reused=False):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attention = Attention(cfg, computes, attention_reused)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = MLP(cfg)

    def forward(self, x, **attention_args):
        a, attended = self.attention(self.attention_norm(x), **attention_args)
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x)), attended


# ----------------------------------------------------------------------------------------------------
# The layer-aware cache: a K slot per layer that computes keys, a V slot per layer that computes values.
# K/V consumers have neither (they read their producer's); attention consumers only a V slot.

class KVCache(nn.Module):
    """The static KV cache, written in place at input_pos: slots k0, k1, ... and v0, v1, ..., each a (B, KVH,
    max_len, hd) buffer of its own (torch.compile writes a slice of one stacked buffer by copying it whole)."""

    def __init__(self, n_k_slots, n_v_slots, batch_size, max_len, n_kv_head, head_dim, dtype, device):
        super().__init__()
        for which, n in (("k", n_k_slots), ("v", n_v_slots)):
            for number in range(n):
                self.register_buffer(f"{which}{number}", torch.zeros(batch_size, n_kv_head, max_len, head_dim,
                                                                   dtype=dtype, device=device), persistent=False)
        self.n_slots = {"k": n_k_slots, "v": n_v_slots}
        self.batch_size, self.max_len = batch_size, max_len

    def slot(self, which, number):
        """K (which="k") or V slot number `number`: (B, KVH, max_len, hd)."""
        return getattr(self, f"{which}{number}")

    def write(self, which, number, input_pos, x):
        """Write x (B, KVH, T, hd) at input_pos (T,), in the cache's dtype; return the whole slot (B, KVH, S, hd)."""
        buffer = self.slot(which, number)
        buffer[:, :, input_pos] = x.to(buffer.dtype)
        return buffer

    @property
    def dtype(self):
        return self.k0.dtype

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self.buffers())


def assign_cache_slots(computes):
    """(K slot, V slot) per layer: where it caches the keys (values) it computes, None if none; in layer order."""
    k_layers, v_layers = ([i for i, c in enumerate(computes) if p in c] for p in ("k", "v"))
    return [(k_layers.index(i) if "k" in c else None, v_layers.index(i) if "v" in c else None)
            for i, c in enumerate(computes)]


# ----------------------------------------------------------------------------------------------------
# The model

class LLaMA(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.kv_sources, self.att_sources = resolve_sharing(config)  # fixed: other specs make another model
        self.reads_from = [projection_sources(self.kv_sources, self.att_sources, i) for i in range(config.n_layer)]
        computes = computed_projections(self.kv_sources, self.att_sources)
        self.cache_slots = assign_cache_slots(computes)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.reuses = [reused_attention(self.reads_from, i) for i in range(config.n_layer)]  # decode hands probs up
        self.layers = nn.ModuleList(Block(config, c, attention_reused=i in self.reuses) for i, c in enumerate(computes))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.kv_cache = None
        for m in self.modules():  # GPT-2's init: N(0, 0.02), then the residual projections scaled down
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied head is counted once

    def set_dropout(self, p):
        """Set the dropout probability everywhere (a setting, not a weight: checkpoints carry their own)."""
        self.config.dropout = p
        for m in self.modules():
            if isinstance(m, (Attention, MLP)):
                m.dropout = p
        return self

    def setup_cache(self, batch_size, max_len, dtype=None):
        """The static KV cache: K and V slots of max_len positions for the layers that compute them, in the dtype
        K/V are computed in (autocast's if it is on, else the weights')."""
        if max_len > self.config.block_size:
            raise UsageError(f"cache length {max_len} exceeds the context window block_size={self.config.block_size}")
        device = self.tok_embeddings.weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.tok_embeddings.weight.dtype
        c = self.kv_cache
        if c is not None and (c.batch_size, c.max_len, c.dtype, c.k0.device) == (batch_size, max_len, dtype, device):
            return  # reuse: stale entries are never read (masked, then overwritten), and a compiled step stays valid
        n_k, n_v = (sum(n is not None for n in numbers) for numbers in zip(*self.cache_slots))
        self.kv_cache = KVCache(n_k, n_v, batch_size, max_len, self.config.n_kv_head, self.config.head_dim, dtype, device)

    def layer_step(self, i, x, seen, *, rope, mode=FULL, mask=None, cache=None, input_pos=None, reads=None):
        """Run layer i on the residual stream x, handed the q, k, v its sources attended with (seen[j]: layer j's
        Attended; reads_from[i]), and append its own Attended. reads: other sources for one full pass (analysis
        trying a pairing unconverted: the layer's own projections sit idle); cache slots follow the model's specs."""
        src = reads or self.reads_from[i]
        given = Given(*(getattr(seen[src[p]], p) if src[p] != i else None for p in "qkv"),
                      probs=seen[self.reuses[i]].probs if self.reuses[i] is not None else None)  # decode only
        x, attended = self.layers[i](x, rope=rope, mode=mode, mask=mask, given=given, cache=cache,
                                     slots=self.cache_slots[i], input_pos=input_pos)
        seen.append(attended)
        return x

    def forward(self, idx, targets=None, input_pos=None, all_logits=False, hidden_at=(), head=True):
        """idx: (B, T) token ids; without input_pos a full causal pass from position 0 (training), with input_pos
        (T,) the tokens sit there and attend through the KV cache. Returns (logits, loss, hidden): logits (B, T, V)
        with targets or all_logits, else (B, 1, V), the last position's, all generating needs; loss the CE with
        targets; hidden the residual stream (B, T, C) after each layer in hidden_at. head=False: the normed stream
        (B, T, C) instead of logits, for a loss that applies the head in chunks (echo/distill.py)."""
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise UsageError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}")
            mode, rope, mask, cache = FULL, (self.rope_cos[:T], self.rope_sin[:T]), None, None
        else:
            cache = self.kv_cache
            if cache is None:
                raise UsageError("input_pos given but there is no KV cache: call model.setup_cache(batch, max_len) "
                                 "first (generate.py's generate_tokens does)")
            mode = DECODE if T == 1 else PREFILL
            rope = self.rope_cos[input_pos], self.rope_sin[input_pos]                     # (T, hd/2) each
            # query at position p sees cached keys 0..p; explicit, because is_causal would align top-left
            mask = input_pos[:, None] >= torch.arange(cache.max_len, device=idx.device)  # (T, S)
        x = F.dropout(self.tok_embeddings(idx), self.config.dropout, self.training)   # (B, T, C)
        seen, hidden = [], []  # seen[j] = what layer j attended with in this pass
        for i in range(len(self.layers)):
            x = self.layer_step(i, x, seen, rope=rope, mode=mode, mask=mask, cache=cache, input_pos=input_pos)
            if i in hidden_at:
                hidden.append(x)
        if not head:
            return self.norm(x), None, hidden                                            # (B, T, C)
        if targets is None and not all_logits:
            x = x[:, -1:]                                                                # (B, 1, C)
        logits = self.output(self.norm(x)).float()                                       # (B, T or 1, V)
        loss = None
        if targets is not None:  # reshape, not view: targets may be a slice such as x[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, hidden


def make_optimizer(model, learning_rate, weight_decay, betas):
    """AdamW over the parameters that train (the fused kernel: ~8% faster steps even on a CPU); weight decay
    on matrices only, not on norms (as nanoGPT's configure_optimizers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)
