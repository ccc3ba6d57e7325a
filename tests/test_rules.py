"""Who computes what is one rule, model.projection_sources: the weights a layer has, its cache slots, the tensors
it really attends with, the cost counts and the conversion all follow it, for any valid pair of specs; and a
rule changed in model.py alone changes all of them together."""
import os
import shutil
import subprocess
import sys
import textwrap

import torch
from hypothesis import given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from echo.conversion import convert_sharing
from echo.generate import inference_layout
from model import LLaMA, ModelConfig, projection_sources
from echo.costs import kv_cache_bytes, matmul_params, projection_counts, training_flops_per_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@st.composite
def spec_pairs(draw):
    """(n_layer, kv_share, att_share): each layer its own source, a K/V consumer of a lower layer that computes
    its own q, k and v, or an attention consumer of a lower layer that computes its own q (MIXED pairs)."""
    n = draw(st.integers(2, 6))
    kv, att = [0], [0]
    for i in range(1, n):
        choices = [("own", i)] + [("kv", s) for s in range(i) if kv[s] == s and att[s] == s] + \
                  [("att", s) for s in range(i) if att[s] == s]
        kind, s = draw(st.sampled_from(choices))
        kv.append(s if kind == "kv" else i)
        att.append(s if kind == "att" else i)
    return n, ",".join(map(str, kv)), ",".join(map(str, att))


def attended_per_layer(model, idx, **kwargs):
    """What each layer attended with in one forward pass (its Attended), captured by hooks."""
    seen = {}
    hooks = [layer.attention.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[1]))
             for i, layer in enumerate(model.layers)]
    try:
        model(idx, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@settings(max_examples=25, deadline=None)
@given(spec_pairs(), st.sampled_from([(6, 6), (6, 2), (6, 3), (6, 1)]), st.booleans())
def test_weights_slots_tensors_and_counts_follow_the_rule(pair, heads, tied):
    n, kv_share, att_share = pair
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, block_size=16, n_layer=n, n_head=heads[0], n_kv_head=heads[1], n_embd=24,
                      intermediate_size=40, tie_embeddings=tied, kv_share=kv_share, att_share=att_share)
    model = LLaMA(cfg).eval()
    rule = [projection_sources(model.kv_sources, model.att_sources, i) for i in range(n)]
    for i, src in enumerate(rule):
        for p in "qkv":  # a layer has a projection exactly when it is its own source for it; a source has it
            assert hasattr(model.layers[i].attention, f"w{p}") == (src[p] == i)
            assert hasattr(model.layers[src[p]].attention, f"w{p}")
        assert (model.cache_slots[i][0] is not None, model.cache_slots[i][1] is not None) == (src["k"] == i, src["v"] == i)
        assert model.reads_from[i] == src and model.layers[i].attention.computes == [p for p in "qkv" if src[p] == i]
    counts = projection_counts(cfg)
    assert counts == {p: sum(src[p] == i for i, src in enumerate(rule)) for p in "qkv"}
    assert matmul_params(cfg) == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    model.setup_cache(3, 16, dtype=torch.float32)
    assert model.kv_cache.nbytes == kv_cache_bytes(cfg, 3, 16, bytes_per_element=4)
    # the tensors a layer attends with are its sources' own objects, in a full pass and in a decode step
    idx = torch.randint(0, 37, (3, 9))
    with torch.no_grad():
        full = attended_per_layer(model, idx)
        model(idx[:, :8], input_pos=torch.arange(8))
        step = attended_per_layer(model, idx[:, 8:], input_pos=torch.tensor([8]))
    for seen in (full, step):
        for i, src in enumerate(rule):
            for p in "qkv":
                assert (getattr(seen[i], p) is getattr(seen[src[p]], p)) or src[p] == i
    same = lambda i, j: step[i].q is step[j].q and step[i].k is step[j].k  # the same softmax  # noqa: E731
    for i in range(n):  # at decode, the lowest layer attending with a q and k that a layer above attends with too
        # computes their probabilities and hands them up; whatever the rule's reason for the pairing
        assert (step[i].probs is not None) == (not any(same(i, j) for j in range(i))
                                               and any(same(i, j) for j in range(i + 1, n)))
    # the FLOP formula follows the same rule (the math kernel, so the counter sees attention too)
    B, T = 2, 7
    x = torch.randint(0, 37, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.train()(x, targets=x)[1].backward()
    assert counter.get_total_flops() == training_flops_per_token(cfg, T) * B * T
    # converting a plain model to these specs keeps exactly the projections the rule says each layer computes
    plain = LLaMA(ModelConfig(**{**cfg.__dict__, "kv_share": "none", "att_share": "none"}))
    converted = convert_sharing(plain, kv_share, att_share)
    assert converted.state_dict().keys() == model.state_dict().keys()
    # the inference layout (q|k|v rows as one matrix a layer, w1|w3 another) keeps the state dict and every logit
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        full = model(idx, all_logits=True)[0]
        model(idx[:, :8], input_pos=torch.arange(8))
        step = model(idx[:, 8:], input_pos=torch.tensor([8]))[0]
        inference_layout(model)
        for i, src in enumerate(rule):
            rows = sum((cfg.n_head if p == "q" else cfg.n_kv_head) * cfg.head_dim for p in "qkv" if src[p] == i)
            assert model.layers[i].attention.wqkv.weight.shape == (rows, cfg.n_embd)
            assert model.layers[i].feed_forward.w13.weight.shape == (2 * cfg.intermediate_size, cfg.n_embd)
        fused_state = model.state_dict()
        assert fused_state.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in fused_state.items())
        torch.testing.assert_close(model(idx, all_logits=True)[0], full, atol=1e-5, rtol=1e-5)
        model(idx[:, :8], input_pos=torch.arange(8))
        torch.testing.assert_close(model(idx[:, 8:], input_pos=torch.tensor([8]))[0], step, atol=1e-5, rtol=1e-5)
        model.load_state_dict(converted.state_dict())  # a state dict loads into the fused layout too
        torch.testing.assert_close(model(idx, all_logits=True)[0], converted.eval()(idx, all_logits=True)[0],
                                   atol=1e-5, rtol=1e-5)


RULE = '    return {"q": att_sources[i], "k": kv_sources[att_sources[i]], "v": kv_sources[i]}'
CHANGED_RULES = {  # attention consumers also take their source's values; or take the keys of their own producer
    "v": RULE.replace('"v": kv_sources[i]', '"v": kv_sources[att_sources[i]]'),
    "k": RULE.replace('"k": kv_sources[att_sources[i]]', '"k": kv_sources[i]')}

CHECK = textwrap.dedent("""
    import sys

    def check():
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode
        from echo.conversion import convert_sharing
        from model import LLaMA, ModelConfig
        import model as model_module
        from echo.costs import decode_bytes_per_step, kv_cache_bytes, matmul_params, training_flops_per_token
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=37, block_size=16, n_layer=5, n_head=6, n_kv_head=2, n_embd=24,
                          intermediate_size=40, tie_embeddings=False, att_share="0,1,1,3,1")
        plain = LLaMA(ModelConfig(**{**cfg.__dict__, "att_share": "none"})).eval()
        model = convert_sharing(plain, att_share=cfg.att_share).eval()
        model.setup_cache(2, 16, dtype=torch.float32)
        x = torch.randint(0, 37, (2, 11))
        with torch.no_grad():
            full = model(x, all_logits=True)[0]
            cached = torch.cat([model(x[:, :6], input_pos=torch.arange(6), all_logits=True)[0]]
                               + [model(x[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(6, 11)], 1)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.train()(x, targets=x)[1].backward()
        # the bytes a decode step reads: every weight, and what each layer hands to attention: test_perf.py's spy, written
        # again because this runs in its own process on the copied code, where the tests' helpers would import the original
        reads, inside = [], []
        def spy(name, *tensors):
            real = getattr(model_module, name)
            def counted(*args):
                if not inside:
                    reads.append(sum(args[i].nbytes for i in tensors))
                inside.append(name)
                try:
                    return real(*args)
                finally:
                    inside.pop()
            setattr(model_module, name, counted)
        spy("attend_masked", 1, 2); spy("attend_explicit", 1, 2); spy("mix_values", 0, 1)
        model.eval().setup_cache(2, 16, dtype=torch.float32)
        with torch.no_grad():
            model(x[:, :1], input_pos=torch.tensor([5]))
        weights = sum(p.nbytes for p in model.parameters()) - model.tok_embeddings.weight.nbytes + 2 * 24 * 4
        # kv_init=mean: layer 1's values start as the mean of the layers that will read them, whichever the rule says
        mean = convert_sharing(plain, att_share=cfg.att_share, kv_init="mean").state_dict()["layers.1.attention.wv.weight"]
        wv = lambda j: plain.layers[j].attention.wv.weight
        return {"wv": [hasattr(l.attention, "wv") for l in model.layers], "wk": [hasattr(l.attention, "wk") for l in model.layers],
               "reuses": model.reuses, "k_slots": model.kv_cache.n_slots["k"],
               "bytes_ok": len(reads) == 5 and decode_bytes_per_step(cfg, 2, 16, 4) == weights + sum(reads),
               "wv1_mean_of": [s for s in ([1], [1, 2, 4]) if torch.allclose(mean, sum(wv(j) for j in s) / len(s))],
               "v_slots": model.kv_cache.n_slots["v"], "cache_ok": model.kv_cache.nbytes == kv_cache_bytes(cfg, 2, 16, 4),
               "params_ok": matmul_params(cfg) == sum(m.weight.numel() for m in model.modules()
                                                      if isinstance(m, torch.nn.Linear)),
               "flops_ok": counter.get_total_flops() == training_flops_per_token(cfg, 11) * 2 * 11,
               "exact": torch.allclose(full, cached, atol=1e-5)}

    results = []
    for folder in sys.argv[1:]:  # each a copy of the code: import it afresh, nothing of the one before kept
        for name in [m for m in sys.modules if m == "model" or m == "echo" or m.startswith("echo.")]:
            del sys.modules[name]
        sys.path.insert(0, folder)
        results.append(check())
        sys.path.remove(folder)
    print(results)
""")


def run_checks(folders):
    """CHECK on each copy of the code, all in one process (the interpreter and torch started once)."""
    out = subprocess.run([sys.executable, "-c", CHECK, *map(str, folders)], cwd=folders[0], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def test_a_rule_changed_in_model_py_alone_changes_everything(tmp_path):
    """On a copy of the code, change one line of projection_sources. Attention consumers also take their source's
    values: they lose wv and their V slots, and the counts, the FLOPs, the bytes a decode step reads, the cached
    pass and kv_init=mean's readers follow. Or they attend with keys of their own (their own producer's): they gain
    wk and K slots, and decode's reuse of their source's probabilities ends, the cached pass still exact."""
    source = open(os.path.join(ROOT, "model.py")).read()
    assert source.count(RULE) == 1, "projection_sources changed: update RULE to match it"
    folders = {}
    for name, rule in [("before", RULE), *CHANGED_RULES.items()]:  # a copy of the code per rule
        folders[name] = tmp_path / name
        shutil.copytree(ROOT, folders[name], ignore=lambda d, files: [f for f in files if not (
            f.endswith(".py") and d == ROOT or f == "echo" or d.endswith("echo") and f.endswith(".py"))])
        (folders[name] / "model.py").write_text(source.replace(RULE, rule))
    results = dict(zip(folders, run_checks(list(folders.values()))))
    before, v, k = results["before"], results["v"], results["k"]
    assert before["wv"] == [True] * 5 and before["v_slots"] == 5 and before["wk"] == [True, True, False, True, False]
    assert v["wv"] == [True, True, False, True, False] and v["v_slots"] == 3
    assert before["wv1_mean_of"] == [[1]] and v["wv1_mean_of"] == [[1, 2, 4]]  # its readers under each rule
    assert before["reuses"] == v["reuses"] == [None, None, 1, None, 1] and before["k_slots"] == 3
    assert k["wk"] == [True] * 5 and k["k_slots"] == 5 and k["reuses"] == [None] * 5
    for result in results.values():
        assert all(result[k] for k in ("cache_ok", "params_ok", "flops_ok", "exact", "bytes_ok")), result
