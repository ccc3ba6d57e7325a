"""What a model costs: KV-cache bytes, matmul weights, training FLOPs, the bytes a decode step reads. Each count
follows from which layers compute their own q, k and v (model.projection_sources), never from the device. They
are the numerators of MFU (training FLOPs per token x tokens/s / peak FLOP/s) and MBU (decode bytes per step /
step time / peak bytes/s); the denominators, the device's peaks, are measure.py's."""
from model import computed_projections, projection_sources, resolve_sharing, reused_attention


# ----------------------------------------------------------------------------------------------------
# What a model computes and reads. A K/V consumer computes only q, an attention consumer only v. Every layer
# still attends, so the attention FLOP term keeps all n_layer layers (PaLM appendix B, as nanoGPT): a
# consumer's scores are recomputed in training, not stored.

def projection_counts(cfg):
    """How many layers compute their own queries, keys and values: {'q': .., 'k': .., 'v': ..}."""
    computes = computed_projections(*resolve_sharing(cfg))
    return {p: sum(p in c for c in computes) for p in ("q", "k", "v")}


def kv_cache_bytes(cfg, batch_size, max_len, bytes_per_element=2):
    """Closed form: (K slots + V slots) x batch x positions x KV heads x head_dim x element size."""
    n = projection_counts(cfg)
    return (n["k"] + n["v"]) * batch_size * max_len * cfg.n_kv_head * cfg.head_dim * bytes_per_element


def matmul_params(cfg):
    """Weights that take part in a matmul per token: attention and MLP projections and the LM head. Sharing
    removes projections (wq and wk of attention consumers, wk and wv of K/V consumers); every layer keeps wo."""
    d, n = cfg.n_embd, projection_counts(cfg)
    q, kv = d * cfg.n_head * cfg.head_dim, d * cfg.n_kv_head * cfg.head_dim
    wo_mlp = d * cfg.n_head * cfg.head_dim + 3 * d * cfg.intermediate_size
    return n["q"] * q + (n["k"] + n["v"]) * kv + cfg.n_layer * wo_mlp + d * cfg.vocab_size


def training_flops_per_token(cfg, seq_len, frozen=frozenset()):
    """Forward + backward FLOPs per token of a training step. Forward: 2 per matmul weight (multiply + add),
    and per layer, head and position 4 for attention's two matmuls (scores, mixing). Backward: each matmul's
    input gradient (2 per weight) and weight gradient (2), attention's four (dV, dP, dQ, dK: 8). With
    everything training that is 6 per weight and 12 for attention (PaLM appendix B, as nanoGPT).
    frozen: names of parameters that do not train. Autograd then computes only the gradients that lead to a
    trained weight: a frozen weight gets no weight gradient, and nothing below the lowest trained weight runs
    backward at all. So this follows, tensor by tensor, which ones need a gradient."""
    kv_sources, att_sources = resolve_sharing(cfg)
    d, hd, inner = cfg.n_embd, cfg.head_dim, cfg.intermediate_size
    size = {"q": d * cfg.n_head * hd, "k": d * cfg.n_kv_head * hd, "v": d * cfg.n_kv_head * hd,
            "wo": cfg.n_head * hd * d, "w1": d * inner, "w3": d * inner, "w2": inner * d}
    att = 2 * cfg.n_head * hd * seq_len  # per token, one of attention's two matmuls (scores or mixing)

    def trains(name):
        return name not in frozen

    def matmul_flops(weight, input_grad, weight_grad):
        """A matmul by a weight of `weight` elements: forward, then the input's and the weight's gradients if needed."""
        flops = 2 * weight
        if input_grad:
            flops += 2 * weight
        if weight_grad:
            flops += 2 * weight
        return flops

    flops = 0
    stream_grad = trains("tok_embeddings.weight")  # whether the residual stream needs a gradient so far
    output_grad = {}  # (layer, "q"/"k"/"v"): whether that layer's projection output needs a gradient
    for i, computes in enumerate(computed_projections(kv_sources, att_sources)):
        def w(name):
            return f"layers.{i}.{name}.weight"
        normed_grad = stream_grad or trains(w("attention_norm"))
        for p in computes:
            flops += matmul_flops(size[p], normed_grad, trains(w(f"attention.w{p}")))
            output_grad[i, p] = normed_grad or trains(w(f"attention.w{p}"))
        # attention, over the q, k and v this layer attends with, wherever they were computed
        q_grad, k_grad, v_grad = (output_grad[src, p] for p, src in projection_sources(kv_sources, att_sources, i).items())
        flops += 2 * att                # forward: scores, then mixing the values
        if v_grad:
            flops += att                # dV
        if q_grad or k_grad:
            flops += att                # dP, the probabilities' gradient, which dQ and dK start from
        if q_grad:
            flops += att                # dQ
        if k_grad:
            flops += att                # dK
        mixed_grad = q_grad or k_grad or v_grad
        flops += matmul_flops(size["wo"], mixed_grad, trains(w("attention.wo")))
        stream_grad = stream_grad or mixed_grad or trains(w("attention.wo"))
        normed_grad = stream_grad or trains(w("ffn_norm"))
        for name in ("w1", "w3"):
            flops += matmul_flops(size[name], normed_grad, trains(w(f"feed_forward.{name}")))
        gated_grad = normed_grad or trains(w("feed_forward.w1")) or trains(w("feed_forward.w3"))
        flops += matmul_flops(size["w2"], gated_grad, trains(w("feed_forward.w2")))
        stream_grad = stream_grad or gated_grad or trains(w("feed_forward.w2"))
    head = "tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"
    return flops + matmul_flops(d * cfg.vocab_size, stream_grad or trains("norm.weight"), trains(head))


def decode_bytes_per_step(cfg, batch_size, context, bytes_per_element):
    """Bytes one decode step reads: every weight once (of the embedding table only the B rows looked up, unless
    the head is tied to it), and each layer's reads of the cache over `context` positions as they happen, from
    the layers the rule says it attends with: the V slot of its values' layer, and the K slot of its keys' layer,
    except where it reuses a lower layer's attention (model.reused_attention): then that layer's probabilities
    (B x n_head x context) instead of keys. A slot read by several layers counts once per reader."""
    d, (kv_sources, att_sources) = cfg.n_embd, resolve_sharing(cfg)
    weights = matmul_params(cfg) + (2 * cfg.n_layer + 1) * d + (0 if cfg.tie_embeddings else batch_size * d)
    slot = batch_size * cfg.n_kv_head * context * cfg.head_dim
    probs = batch_size * cfg.n_head * context
    reads_from = [projection_sources(kv_sources, att_sources, i) for i in range(cfg.n_layer)]
    cache = 0
    for i in range(cfg.n_layer):
        cache += slot                                                         # the values' V slot
        cache += slot if reused_attention(reads_from, i) is None else probs  # the keys' K slot, or reused probabilities
    return (weights + cache) * bytes_per_element


def step_flops(model, teacher, seq_len):
    """Model FLOPs per token of a training step, what is really computed: the student's forward and backward
    (frozen weights get no weight gradient, layers below every trained weight no backward) and, when
    distilling, the teacher's forward (a third of a full step's)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return training_flops_per_token(model.config, seq_len, frozen) + (
        training_flops_per_token(teacher.config, seq_len) / 3 if teacher is not None else 0)
