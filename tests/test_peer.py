"""bench.py parts=peer against a stand-in for gpt-fast written here (gpt-fast itself is not installed in CI): a model
with gpt-fast's interface and layout (fused wqkv filled by a load hook, interleaved RoPE pairs, a cache per layer,
K/V repeated to every query head), so the weight conversion must permute rows and fuse to give the same tokens.
Also the kernels-per-step count the comparison reports, pinned for our compiled decode step."""
import os
import re

import pytest
import torch

from conftest import run_script
from echo.generate import inference_layout
from model import LLaMA, ModelConfig
from echo.peer import interleave_rope_rows, load_peer, peer_check
from echo.measure import decode_kernels

STAND_IN = '''
import torch, torch.nn as nn, torch.nn.functional as F
from dataclasses import dataclass

@dataclass
class ModelArgs:
    block_size: int = 64; vocab_size: int = 100; n_layer: int = 2; n_head: int = 4; dim: int = 32
    intermediate_size: int = 64; n_local_heads: int = -1; head_dim: int = 0; rope_base: float = 10000
    norm_eps: float = 1e-5
    def __post_init__(self):
        self.n_local_heads = self.n_head if self.n_local_heads == -1 else self.n_local_heads
        self.head_dim = self.dim // self.n_head

class Norm(nn.Module):
    def __init__(self, d, eps):
        super().__init__(); self.eps = eps; self.weight = nn.Parameter(torch.ones(d))
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

def rotate(x, cos, sin):  # pairs (2j, 2j+1): ROTATE_PAIRS
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, b * cos + a * sin), -1).flatten(-2)

class Attention(nn.Module):
    def __init__(self, c):
        super().__init__(); self.c = c
        self.wqkv = nn.Linear(c.dim, (c.n_head + 2 * c.n_local_heads) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)
        self._register_load_state_dict_pre_hook(self.fuse)
    def fuse(self, state, prefix, *args):
        if prefix + "wq.weight" in state:
            state[prefix + "wqkv.weight"] = torch.cat([state.pop(prefix + k) for k in ("wq.weight", "wk.weight", "wv.weight")])
    def forward(self, x, cos, sin, mask, pos, cache):
        c, (B, T, _) = self.c, x.shape
        q, k, v = self.wqkv(x).split([c.dim, c.n_local_heads * c.head_dim, c.n_local_heads * c.head_dim], -1)
        q = rotate(q.view(B, T, c.n_head, c.head_dim).transpose(1, 2), cos, sin)
        k = rotate(k.view(B, T, c.n_local_heads, c.head_dim).transpose(1, 2), cos, sin)
        cache[0][:, :, pos] = k; cache[1][:, :, pos] = v.view(B, T, c.n_local_heads, c.head_dim).transpose(1, 2)
        g = c.n_head // c.n_local_heads
        y = F.scaled_dot_product_attention(q, cache[0].repeat_interleave(g, 1), cache[1].repeat_interleave(g, 1),
                                           attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, c.dim))

class FeedForward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.w1 = nn.Linear(c.dim, c.intermediate_size, bias=False); self.w3 = nn.Linear(c.dim, c.intermediate_size, bias=False)
        self.w2 = nn.Linear(c.intermediate_size, c.dim, bias=False)
    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention, self.feed_forward = Attention(c), FeedForward(c)
        self.attention_norm, self.ffn_norm = Norm(c.dim, c.norm_eps), Norm(c.dim, c.norm_eps)

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__(); c = self.config = config
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm, self.output = Norm(c.dim, c.norm_eps), nn.Linear(c.dim, c.vocab_size, bias=False)
        self.max_seq_length = -1
    def setup_caches(self, batch, length):
        if self.max_seq_length >= length:
            return
        c, self.max_seq_length = self.config, length
        self.caches = [[torch.zeros(batch, c.n_local_heads, length, c.head_dim) for _ in "kv"] for _ in self.layers]
        angles = torch.outer(torch.arange(c.block_size).float(),
                             1.0 / c.rope_base ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        self.cos, self.sin = angles.cos(), angles.sin()
    def forward(self, idx, input_pos):
        mask = input_pos[:, None] >= torch.arange(self.max_seq_length)
        x = self.tok_embeddings(idx)
        for layer, cache in zip(self.layers, self.caches):
            x = x + layer.attention(layer.attention_norm(x), self.cos[input_pos], self.sin[input_pos], mask, input_pos, cache)
            x = x + layer.feed_forward(layer.ffn_norm(x))
        return self.output(self.norm(x))
'''


def stand_in(tmp_path, pairs="interleaved"):
    folder = tmp_path / pairs
    os.makedirs(folder, exist_ok=True)
    text = STAND_IN if pairs == "interleaved" else STAND_IN.replace(
        "a, b = x[..., 0::2], x[..., 1::2]\n    return torch.stack((a * cos - b * sin, b * cos + a * sin), -1).flatten(-2)",
        "a, b = x.chunk(2, -1)\n    return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)")
    (folder / "model.py").write_text(text)
    return str(folder)


def test_interleaving_pairs_each_heads_halves():
    w = torch.arange(2 * 6 * 3).reshape(12, 3)  # 2 heads of head_dim 6: rows (0,3), (1,4), (2,5) pair up
    rows = interleave_rope_rows(w, 2)[:, 0] // 3
    assert rows.tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]


@pytest.mark.parametrize("n_head,n_kv_head", [(6, 2), (6, 1)])
def test_the_peer_with_our_weights_gives_our_greedy_tokens(tmp_path, n_head, n_kv_head):
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(vocab_size=97, block_size=64, n_layer=3, n_head=n_head, n_kv_head=n_kv_head, n_embd=36,
                              intermediate_size=50, tie_embeddings=False)).eval()
    with torch.no_grad():  # sharp attention that moves the logits, so that rotating wrong pairs changes the tokens
        for layer in model.layers:
            for w in ("wq", "wk", "wv", "wo"):
                getattr(layer.attention, w).weight.mul_(40 if w in ("wq", "wk") else 8)
    assert peer_check(inference_layout(model), load_peer(f"gpt-fast:{stand_in(tmp_path)}")) == 24  # as bench.py does
    # the halves layout (no permutation expected) must be caught before any timing
    with pytest.raises(ValueError, match="greedy tokens differ"):
        peer_check(model, load_peer(f"gpt-fast:{stand_in(tmp_path, 'halves')}"))


def test_bench_parts_peer_runs_and_bad_peers_are_one_line(tmp_path):
    base = ["bench.py", "--quick", "--variants=none", "--parts=peer", "--contexts=24", "--decode_batch=1", "--rounds=1",
            "--n_layer=2", "--dtype=float32"]  # the stand-in's cache is fp32, as its (simplified) setup_caches makes it
    r = run_script(*base, f"--peer=gpt-fast:{stand_in(tmp_path)}")
    assert r.returncode == 0, r.stderr
    assert "greedy tokens identical over 24" in r.stdout and "compiled, ours/theirs" in r.stdout
    assert re.search(r"kernels per compiled decode step \(generated \+ library\): ours \d+ \+ \d+, gpt-fast \d+ \+ \d+",
                     r.stdout), r.stdout
    row = r.stdout.splitlines()[-1].split()  # batch, context, then tokens/s (MBU %) of each of the four, the ratio
    assert row[:2] == ["1", "24"] and len(row) == 2 + 4 * 2 + 1 and all(m.endswith("%)") for m in row[3:10:2])
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.py").write_text("x = 1\n")
    for peer, match in ((f"gpt-fast:{tmp_path / 'empty'}", "no model.py"), ("llama:/x", "expected gpt-fast:PATH"),
                        (f"gpt-fast:{tmp_path / 'other'}", "not gpt-fast's model.py")):
        bad = run_script(*base, f"--peer={peer}")
        assert bad.returncode == 1 and match in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# Kernels one compiled decode step launches, for a 4-layer GQA model (d=48, 6 heads / 2 KV heads, batch 1,
# 32 cached positions), as `python -c "..."` of this test's body prints them. A change that makes the step
# launch more kernels fails here: on a GPU each one is a launch inside the CUDA graph.
KERNELS = {("none", "none"): (17, 21), ("echo:2", "none"): (17, 21), ("none", "echo:2"): (18, 22),
           ("0,1,1,3", "0,1,2,1"): (18, 22)}


@pytest.mark.parametrize("kv_share,att_share", list(KERNELS))
def test_kernels_per_decode_step_do_not_grow(kv_share, att_share):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = LLaMA(ModelConfig(vocab_size=83, block_size=32, n_layer=4, n_head=6, n_kv_head=2, n_embd=48,
                              intermediate_size=80, kv_share=kv_share, att_share=att_share)).eval()
    inference_layout(model)  # as sample.py and bench.py decode: q|k|v and w1|w3 each fused into one matrix
    model.setup_cache(1, 32)
    counted = decode_kernels(torch.compile(model, fullgraph=True), 1, "cpu")
    generated, library = KERNELS[kv_share, att_share]
    assert counted["generated"] <= generated and counted["library"] <= library, counted
