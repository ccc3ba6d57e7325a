"""Generation, as gpt-fast shapes it: one prefill pass over the prompt fills the static KV cache, then one
cached decode step per token writes at input_pos. Also the sampling rules, and what makes decoding fast: a
compiled decode step, and on a CPU a weight layout that matrix-vector products stream well."""
import torch
import torch.nn as nn

from model import UsageError


def cache_len(model, prompt_len, max_new_tokens):
    """Positions the cache needs to generate max_new_tokens after a prompt (at most the window). The one
    formula for it: a compiled decode step is specialised to its cache, so a second one would recompile."""
    return min(model.config.block_size, prompt_len + max_new_tokens)


# Tokens between asks whether every row has ended. Asking makes the host wait for the device: on a GPU that
# would stall every step, so there generation asks every 16 tokens (and may run up to 15 past the last end).
STOP_CHECK_EVERY = {"cpu": 1}


@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, vocab_limit=None,
                    step=None, stop=(), keep_cache=False, start_pos=0):
    """Yield (B, 1) new tokens: one prefill pass over the prompt, then one cached decode step each.
    step: the function for a decode step (default: the model; sample.py passes a compiled one).
    stop: end-of-sequence ids. A row that samples one is done (what it samples after is meaningless: callers
    cut each row at its first stop id), and generation ends once every row is done.
    keep_cache: use the cache the model has, which already holds idx[:, :start_pos] (a chat's earlier turns)
    and has room for the rest: only the rest is prefilled. Without it the cache is set up here, from position 0.
    Past block_size the window slides: the last block_size/2 tokens are re-encoded from position 0."""
    B, T = idx.shape
    block = model.config.block_size
    if T > block:
        raise UsageError(f"prompt is {T} tokens, longer than the context window block_size={block}")
    if not keep_cache and start_pos:
        raise ValueError("start_pos > 0 needs keep_cache=True: a fresh cache holds nothing")
    if T <= start_pos:
        raise UsageError("prompt is empty: give at least one token")
    if not keep_cache:
        model.setup_cache(B, cache_len(model, T, max_new_tokens))
    elif model.kv_cache is None or model.kv_cache.max_len < min(block, T + max_new_tokens):
        raise UsageError(f"the cache cannot hold the {T - start_pos} tokens after position {start_pos} and "
                         f"{max_new_tokens} more: set it up first")
    step = model if step is None else step
    context = idx
    logits = model(context[:, start_pos:], input_pos=torch.arange(start_pos, T, device=idx.device))[0][:, -1]
    # the decode position lives on the device and is advanced in place: no host-to-device copy per token,
    # so the host never waits for a CUDA-graph replay, and a captured graph always reads the same address
    pos = torch.full((1,), T - 1, dtype=torch.long, device=idx.device)
    stop = torch.tensor(sorted(stop), device=idx.device) if stop else None
    done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    check_every = STOP_CHECK_EVERY.get(idx.device.type, 16)
    for n in range(max_new_tokens):
        token = sample_logits(logits, temperature, top_k, top_p, vocab_limit)  # (B, 1)
        yield token
        if stop is not None:
            done |= torch.isin(token, stop)
            if n % check_every == check_every - 1 and bool(done.all()):
                break
        if n == max_new_tokens - 1:
            break
        context = torch.cat((context, token), dim=1)
        if context.size(1) > model.kv_cache.max_len:  # window full: re-encode its second half
            context = context[:, -(block // 2):]
            logits = model(context, input_pos=torch.arange(context.size(1), device=idx.device))[0][:, -1]
            pos.fill_(context.size(1) - 1)
        else:
            pos += 1  # = context.size(1) - 1, the new token's position
            logits = step(token, input_pos=pos)[0][:, -1]

def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, vocab_limit=None):
    """idx (B, T) -> (B, T + max_new_tokens), sampled through the KV cache; temperature=0 is greedy."""
    new = list(generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, vocab_limit))
    return torch.cat([idx] + new, dim=1)


def regrow_cache(model, batch_size, max_len):
    """Give the model a cache of batch_size x max_len that keeps what its cache holds: the positions (a position's
    K/V do not depend on the cache's length) and, from a one-row cache, that row for every sequence."""
    old, model.kv_cache = model.kv_cache, None
    model.setup_cache(batch_size, max_len)
    for which, n in old.n_slots.items():
        for slot in range(n):  # (B, KVH, S, hd): a one-row cache broadcasts over B
            model.kv_cache.slot(which, slot)[:, :, :old.max_len] = old.slot(which, slot)


def until_stop(row, stop):
    """A row of generated ids up to (not including) its first stop id."""
    return next((row[:i] for i, t in enumerate(row) if t in stop), row)


def inference_layout(model):
    """The weights laid out for inference (prefill and decode), same values and state_dict. (1) Matrices that multiply the same input
    as one matrix (as gpt-fast loads its wqkv): the q, k, v projections each layer computes, and the MLP's w1 and
    w3. One matmul where there were up to three, and what follows each fuses into one kernel (on a GPU each kernel
    is a launch in the CUDA graph). Only here: in training a conversion stage may freeze one projection and train
    another. (2) On a CPU, every Linear weight stored (in, out)-contiguous, only the strides change. Why: a batch-1
    decode step is one matrix-vector product per weight, and MKL's fp32 product over nn.Linear's (out, in) rows
    runs on one core (12.6 GB/s for the 32000 x 768 head on the 2-core EPYC here) but streams (in, out) rows on
    both (20 GB/s). Decode at 12 x 768, vocab 32000 went from 26.5 to 32.2 tok/s eager."""
    for layer in model.layers:
        fuse_rows(layer.attention, [f"w{p}" for p in layer.attention.computes], "wqkv")
        fuse_rows(layer.feed_forward, ["w1", "w3"], "w13")
    if model.tok_embeddings.weight.device.type == "cpu":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):  # a tied head is the embedding's own Parameter: done once for both
                    m.weight.data = m.weight.data.t().contiguous().t()
    return model


def fuse_rows(module, names, fused):
    """Replace a module's Linears `names` (same input, no bias) by one Linear `fused` stacking their rows in that
    order. Its state dict keeps their names: two hooks split the rows on saving and join them on loading."""
    if hasattr(module, fused):
        return
    rows = [getattr(module, n).weight.size(0) for n in names]
    weight = torch.cat([getattr(module, n).weight.detach() for n in names])  # (sum(rows), in)
    setattr(module, fused, nn.Linear(weight.size(1), weight.size(0), bias=False, device="meta"))
    getattr(module, fused).weight = nn.Parameter(weight)
    for n in names:
        delattr(module, n)
    keys = [f"{n}.weight" for n in names]

    def split_rows(module, state_dict, prefix, local_metadata):
        state_dict.update(zip((prefix + k for k in keys), state_dict.pop(f"{prefix}{fused}.weight").split(rows)))

    def join_rows(module, state_dict, prefix, *args):
        if all(prefix + k in state_dict for k in keys):
            state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(prefix + k) for k in keys])
    module.register_state_dict_post_hook(split_rows)
    module.register_load_state_dict_pre_hook(join_rows)


def compile_decode_step(model, batch_size, max_len, warmup_calls=3):
    """torch.compile the one-token decode step and warm it up on the cache generation will use, so that
    compiling is never timed. The step is one whole graph with static shapes (the cache is written in place
    at input_pos); on a GPU it is replayed as a CUDA graph, which mode="reduce-overhead" records on the
    *second* call: the three warm-up calls compile, record, then replay once. The warm-up writes cache
    position 0, which the prefill rewrites."""
    device = model.tok_embeddings.weight.device
    step = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, fullgraph=True)
    model.setup_cache(batch_size, max_len)
    token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():  # as in generation: grad mode is part of what the compiled graph assumes
        for _ in range(warmup_calls):
            step(token, input_pos=pos)
    return step


def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None, vocab_limit=None):
    """(B, V) logits -> the (B, V') probabilities sample_logits draws from, in this order: padded ids
    dropped (vocab_limit), temperature, then top-k, then top-p (nucleus) over what top-k kept."""
    if vocab_limit is not None:
        logits = logits[:, :vocab_limit]  # ids >= vocab_limit are padding the tokenizer cannot decode
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p: drop a token once those before it cover top_p
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False  # the most likely token always stays
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


NUCLEUS_CANDIDATES = 2048  # top-p looks for its nucleus among this many likeliest tokens first (see sample_logits)


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, vocab_limit=None):
    """(B, V) logits -> (B, 1) token ids drawn from sampling_probs' distribution. temperature 0 = greedy;
    vocab_limit drops padded vocab ids. With top_p, the nucleus is found among the likeliest NUCLEUS_CANDIDATES
    tokens (or top_k's) and the token drawn among them: sorting and sampling a whole 49k vocabulary per row took
    most of a batched decode step on a CPU. A row whose nucleus reaches past the candidates is drawn the slow way."""
    if temperature == 0:
        return logits[:, :vocab_limit].argmax(dim=-1, keepdim=True)
    if top_p is None or top_p >= 1.0:
        return torch.multinomial(sampling_probs(logits, temperature, top_k, None, vocab_limit), num_samples=1)
    logits = logits[:, :vocab_limit].float() / temperature
    k = min(top_k or NUCLEUS_CANDIDATES, logits.size(-1))
    candidates, ids = logits.topk(k, dim=-1)                                       # (B, k), likeliest first
    # the softmax over top_k's tokens, or over all of them
    probs = candidates.softmax(-1) if top_k else logits.softmax(-1).gather(1, ids)
    keep = probs.cumsum(-1) - probs < top_p  # drop a token once those before it cover top_p
    keep[:, 0] = True                        # the likeliest token always stays
    tokens = ids.gather(1, torch.multinomial(probs * keep, num_samples=1))         # (B, 1)
    open_rows = (keep[:, -1] & (k < logits.size(-1))).nonzero().flatten() if not top_k else []
    if len(open_rows):  # the nucleus may reach past the candidates: those rows the slow way
        tokens[open_rows] = torch.multinomial(sampling_probs(logits[open_rows], 1.0, None, top_p), num_samples=1)
    return tokens
