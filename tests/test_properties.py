"""Invariants the project lives on, as properties over random valid shapes and specs (hypothesis, with a
fixed derandomized profile so CI is reproducible): sizes that do not divide evenly, every kv_share kind,
random explicit lists, attention sharing alone and mixed with K/V sharing."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from echo.conversion import adaptation_stages, convert_sharing
from model import LLaMA, ModelConfig, resolve_sharing
from echo.costs import kv_cache_bytes, matmul_params, training_flops_per_token

PROFILE = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def specs(draw, n_layer):
    """Any valid kv_share for n_layer layers: none, echo:N, cla:G (G need not divide n_layer), or a random
    explicit list in which every source is a producer at or below its reader."""
    kind = draw(st.sampled_from(["none", "echo", "cla", "list"]))
    if kind == "none":
        return "none"
    if kind == "echo":
        return f"echo:{draw(st.integers(1, n_layer - 1))}" if n_layer > 1 else "none"
    if kind == "cla":
        return f"cla:{draw(st.integers(1, n_layer))}"
    sources = []
    for i in range(n_layer):
        producers = [j for j in range(i) if sources[j] == j]
        sources.append(i if not producers or draw(st.booleans()) else draw(st.sampled_from(producers)))
    return ",".join(map(str, sources))


@st.composite
def att_specs(draw, kv_share, n_layer):
    """A valid att_share beside kv_share: a layer that reads K/V, or whose K/V another layer reads, computes its
    own attention; any other layer may reuse the attention of a layer at or below it that computes its own."""
    kv = resolve_sharing(ModelConfig(n_layer=n_layer, n_head=1, n_kv_head=1, n_embd=2, kv_share=kv_share))[0]
    if kv_share == "none" and n_layer > 1 and draw(st.booleans()):
        return draw(st.sampled_from([f"echo:{draw(st.integers(1, n_layer - 1))}", f"cla:{draw(st.integers(1, n_layer))}"]))
    sources = []
    for i in range(n_layer):
        free = kv[i] == i and i not in kv[i + 1:]
        computing = [j for j in range(i) if sources[j] == j]
        sources.append(draw(st.sampled_from(computing)) if free and computing and draw(st.booleans()) else i)
    return ",".join(map(str, sources))


@st.composite
def configs(draw):
    n_layer = draw(st.integers(1, 8))
    n_kv_head = draw(st.integers(1, 3))
    n_head = n_kv_head * draw(st.integers(1, 3))           # GQA groups of 1-3, MHA and MQA included
    head_dim = 2 * draw(st.integers(1, 4))
    kv_share = draw(specs(n_layer))
    return ModelConfig(vocab_size=draw(st.integers(5, 40)), block_size=draw(st.integers(4, 24)), n_layer=n_layer,
                       n_head=n_head, n_kv_head=n_kv_head, n_embd=n_head * head_dim,
                       intermediate_size=draw(st.integers(1, 40)), tie_embeddings=draw(st.booleans()),
                       kv_share=kv_share, att_share=draw(att_specs(kv_share, n_layer)))


@PROFILE
@given(configs(), st.data())
def test_cached_prefill_and_decode_equal_the_full_pass(cfg, data):
    torch.manual_seed(0)
    model = LLaMA(cfg).eval()
    B = data.draw(st.integers(1, 3))
    T = data.draw(st.integers(1, cfg.block_size))
    prefill = data.draw(st.integers(1, T))
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        full, _, _ = model(idx, all_logits=True)
        model.setup_cache(B, data.draw(st.integers(T, cfg.block_size)))
        parts = [model(idx[:, :prefill], input_pos=torch.arange(prefill), all_logits=True)[0]]
        t = prefill
        while t < T:  # the rest in chunks of random sizes: several queries at an offset, or one
            n = data.draw(st.integers(1, T - t))
            parts.append(model(idx[:, t:t + n], input_pos=torch.arange(t, t + n), all_logits=True)[0])
            t += n
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@PROFILE
@given(configs())
def test_sources_weights_cache_and_flops_follow_the_spec(cfg):
    sources, att = resolve_sharing(cfg)
    producers = [i for i, s in enumerate(sources) if s == i]
    for kind in (sources, att):
        assert kind[0] == 0 and all(kind[s] == s and s <= i for i, s in enumerate(kind))
    assert all(sources[i] == i or att[i] == i for i in range(cfg.n_layer))  # at most one kind per layer
    torch.manual_seed(0)
    model = LLaMA(cfg)
    keys = model.state_dict().keys()
    has = lambda i, w: f"layers.{i}.attention.{w}.weight" in keys  # noqa: E731
    for i in range(cfg.n_layer):  # a K/V consumer has no wk/wv, an attention consumer no wq/wk; all keep wo
        assert has(i, "wv") == (i in producers) and has(i, "wq") == (att[i] == i)
        assert has(i, "wk") == (i in producers and att[i] == i) and has(i, "wo")
    B, S = 2, cfg.block_size
    model.setup_cache(B, S)
    n_k = sum(has(i, "wk") for i in range(cfg.n_layer))
    assert model.kv_cache.n_slots["k"] == n_k and model.kv_cache.k0.shape == (B, cfg.n_kv_head, S, cfg.head_dim)
    assert model.kv_cache.n_slots["v"] == len(producers)
    assert model.kv_cache.nbytes == kv_cache_bytes(cfg, B, S, 4) == (n_k + len(producers)) * B * S * cfg.n_kv_head * cfg.head_dim * 4
    idx = torch.randint(0, cfg.vocab_size, (B, S))
    with FlopCounterMode(display=False) as counter:
        model(idx, targets=idx)[1].backward()
    # SDPA's CPU flash kernel is not counted, its math fallback (taken for tiny heads) is, exactly as PaLM's term
    assert counter.get_total_flops() in (6 * matmul_params(cfg) * B * S, training_flops_per_token(cfg, S) * B * S)


@PROFILE
@given(configs(), st.sampled_from(["keep", "mean"]))
def test_converting_to_the_models_own_spec_changes_nothing(cfg, kv_init):
    torch.manual_seed(0)
    model = LLaMA(cfg)
    same = convert_sharing(model, ",".join(map(str, model.kv_sources)), ",".join(map(str, model.att_sources)), kv_init)
    a, b = model.state_dict(), same.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@PROFILE
@given(configs(), st.data())
def test_every_conversion_stage_is_a_valid_model_and_the_last_is_the_target(start, data):
    n = start.n_layer
    kv_target = data.draw(specs(n))
    att_target = data.draw(att_specs(kv_target, n))
    begin = dict(zip(("kv_sources", "att_sources"), resolve_sharing(start)))
    stages = adaptation_stages(begin, kv_target, att_target, trainable="stages:layers")
    goal = resolve_sharing(ModelConfig(n_layer=n, n_head=1, n_kv_head=1, n_embd=2, kv_share=kv_target, att_share=att_target))
    assert (stages[-1]["kv_sources"], stages[-1]["att_sources"]) == goal and stages[-1]["trainable"] == "all"
    converted = []
    for st_ in stages:  # every stage is a model the rules allow, and the converted layers only grow
        spec = {k: ",".join(map(str, st_[f"{k[:-6]}_sources"])) for k in ("kv_share", "att_share")}
        resolve_sharing(ModelConfig(n_layer=n, n_head=1, n_kv_head=1, n_embd=2, **spec))
        done = {i for i in range(n) if (st_["kv_sources"][i], st_["att_sources"][i]) == (goal[0][i], goal[1][i])
                and (goal[0][i] != i or goal[1][i] != i)}
        assert not converted or converted[-1] <= done
        converted.append(done)


@PROFILE
@given(configs(), st.data())
def test_training_flops_with_frozen_weights_equal_the_counter(cfg, data):
    """With any set of parameters frozen (as trainable does, and more), the FLOP count is what autograd
    really computes: torch's counter on the math attention kernel (which it counts) agrees exactly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = LLaMA(cfg)
    names = [name for name, _ in model.named_parameters()]
    frozen = set(data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names) - 1)))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    B, T = 2, cfg.block_size
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, targets=idx)[1].backward()
    assert counter.get_total_flops() == training_flops_per_token(cfg, T, frozen) * B * T
    if not frozen:
        assert counter.get_total_flops() == (6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T) * B * T
