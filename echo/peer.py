"""A peer to measure our decode against: gpt-fast (pytorch-labs/gpt-fast), its model.py imported from a local clone
at run time (never copied here), given our weights, so both decode the same model and must agree token for token.

    python bench.py --preset=smollm2 --parts=peer --peer=gpt-fast:/path/to/gpt-fast

gpt-fast fuses wq, wk, wv into one wqkv (its load hook concatenates them), keeps a KV cache per layer with K/V
repeated to every query head at attention, and rotates interleaved pairs (2j, 2j+1) where we rotate the halves
(j, j + hd/2) as Hugging Face does: the rows of wq and wk are permuted to match. Only a plain model has a peer.
"""
import importlib.util
import os

import torch

from model import UsageError
from echo.measure import decode_kernels, decode_tokens_per_s


def load_peer(spec):
    """The peer's model module from 'gpt-fast:PATH' (PATH: a clone of pytorch-labs/gpt-fast), or one clear error."""
    kind, _, path = spec.partition(":")
    if kind != "gpt-fast" or not path:
        raise UsageError(f"peer={spec!r}: expected gpt-fast:PATH, PATH a local clone of pytorch-labs/gpt-fast")
    file = os.path.join(path, "model.py")
    if not os.path.isfile(file):
        raise UsageError(f"peer={spec!r}: no model.py in {path} (a clone of pytorch-labs/gpt-fast is needed)")
    module_spec = importlib.util.spec_from_file_location("gpt_fast_model", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # not gpt-fast's model.py, or one written for another torch
        raise UsageError(f"peer={spec!r}: {file} does not import ({type(e).__name__}: {e})") from None
    if not all(hasattr(module, name) for name in ("Transformer", "ModelArgs")):
        raise UsageError(f"peer={spec!r}: {file} has no Transformer and ModelArgs: not gpt-fast's model.py")
    return module


def interleave_rope_rows(w, n_heads):
    """Our wq/wk rows per head pair (j, j + hd/2); gpt-fast's pair (2j, 2j + 1). w: (n_heads * hd, in)."""
    out, cols = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, cols).transpose(1, 2).reshape(out, cols)


def peer_model(module, model):
    """gpt-fast's Transformer holding `model`'s weights (a plain model: every layer computes its own q, k, v)."""
    c = model.config
    if model.kv_sources != list(range(c.n_layer)) or model.att_sources != list(range(c.n_layer)):
        raise UsageError("the peer runs a plain model: compare it with variant 'none'")
    args = module.ModelArgs(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                            dim=c.n_embd, intermediate_size=c.intermediate_size, n_local_heads=c.n_kv_head,
                            rope_base=c.rope_theta, norm_eps=c.norm_eps)
    state = {}
    for name, w in model.state_dict().items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            w = interleave_rope_rows(w, c.n_head if ".wq." in name else c.n_kv_head)
        state[name] = w.clone()
    state["output.weight"] = model.output.weight.detach().clone()  # gpt-fast keeps its own head, never tied
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    with torch.device(device):
        peer = module.Transformer(args)
    peer.load_state_dict(state)  # its load hook fuses wq, wk, wv into wqkv
    return peer.to(dtype).eval()


@torch.no_grad()
def greedy_tokens(forward, setup, prompt, n):
    """n greedy tokens after prompt (1, T): one prefill, then one cached step each. forward(idx, input_pos) ->
    logits (B, T, V); setup(batch, max_len) prepares the cache."""
    setup(prompt.size(0), prompt.size(1) + n)
    logits = forward(prompt, torch.arange(prompt.size(1), device=prompt.device))
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    for t in range(prompt.size(1), prompt.size(1) + n - 1):
        tokens.append(forward(tokens[-1], torch.tensor([t], device=prompt.device))[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1)


def peer_setup(peer, batch, length):
    """gpt-fast's cache at exactly this size (its setup_caches keeps any cache that is large enough)."""
    peer.max_seq_length = -1
    peer.setup_caches(batch, length)


@torch.no_grad()
def peer_check(model, module, n=24):
    """Greedy tokens of our plain model and gpt-fast's with its weights, eager, from one random prompt: they must
    agree (else one line). Returns how many agreed."""
    peer, device = peer_model(module, model), model.tok_embeddings.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    ours = greedy_tokens(lambda idx, pos: model(idx, input_pos=pos, all_logits=True)[0], model.setup_cache, prompt, n)
    theirs = greedy_tokens(lambda idx, pos: peer(idx, pos), lambda b, t: peer_setup(peer, b, t), prompt, n)
    if not torch.equal(ours, theirs):
        raise UsageError(f"gpt-fast's greedy tokens differ from ours at token {int((ours != theirs).int().argmax())}: "
                         f"its model.py is not the one this conversion is written for")
    return n


def peer_kernels(model, module):
    """Kernels per compiled decode step (batch 1) of our model and of gpt-fast's with its weights."""
    peer, device, kernels = peer_model(module, model), model.tok_embeddings.weight.device, {}
    for name, m, setup in (("ours", model, model.setup_cache), ("gpt-fast", peer, lambda b, t: peer_setup(peer, b, t))):
        torch._dynamo.reset()
        setup(1, min(128, model.config.block_size))
        kernels[name] = decode_kernels(torch.compile(m, fullgraph=True), 1, device)
    return kernels


@torch.no_grad()
def peer_decode_at(peer, batch, context, n, compiled):
    """Tokens/s of gpt-fast's decode with `context` positions cached, compiled as gpt-fast compiles its step
    (fullgraph; a CUDA graph on a GPU) and warmed up before timing."""
    device = peer.output.weight.device
    peer_setup(peer, batch, context + n)
    step = peer
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(peer, mode="reduce-overhead" if device.type == "cuda" else None, fullgraph=True)
        for _ in range(3):  # compile, record the CUDA graph, replay it
            step(torch.zeros(batch, 1, dtype=torch.long, device=device), input_pos=torch.zeros(1, dtype=torch.long,
                                                                                             device=device))
    token = torch.randint(0, peer.config.vocab_size, (batch, 1), device=device)
    return decode_tokens_per_s(step, token, context, n, str(device))


def peer_table(r, batches, contexts):
    """bench.py parts=peer: decode tokens/s of ours and gpt-fast's, eager and compiled, kernels per step, and each
    one's MBU (the bytes a step must read, per second, against the read limit)."""
    check, names = r["peer_check"], ("ours eager", "ours compiled", "gpt-fast eager", "gpt-fast compiled")
    runs = [f"{impl}_{mode}" for impl in ("ours", "gptfast") for mode in ("eager", "compiled")]
    lines = [f"gpt-fast with the same weights: greedy tokens identical over {check['tokens_identical']}; kernels per "
             f"compiled decode step (generated + library): " + ", ".join(f"{k} {v['generated']} + {v['library']}"
                                                                       for k, v in check["kernels"].items()),
             "decode tokens/s (MBU %: the bytes a step must read, per second, against the read limit)",
             f"{'batch':>5} {'context':>7}   " + "".join(f"{n:>19}" for n in names) + f"{'compiled, ours/theirs':>23}"]
    for batch in batches:
        for c in contexts:
            tok_s = [r[f"peer_{run}_b{batch}_{c}"] for run in runs]
            mbu = [r.get(f"peer_mbu_{run}_b{batch}_{c}") for run in runs]
            cells = (f"{x:.1f}" + (f" ({100 * m:.0f}%)" if m is not None else "") for x, m in zip(tok_s, mbu))
            ratio = tok_s[1] / tok_s[3]  # compiled, ours / theirs
            lines.append(f"{batch:>5} {c:>7}   " + "".join(f"{cell:>19}" for cell in cells) + f"{ratio:>22.2f}x")
    return "\n".join(lines)
