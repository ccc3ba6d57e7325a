import json
import os
import subprocess
import sys

import pytest

from bench import variant_sharing
from conftest import ROOT
from model import ModelConfig, kv_cache_bytes, training_flops_per_token


def test_quick_bench_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench.py", "--quick=True", "--naive=True", "--peak_bytes=1e10", f"--json={out}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800,  # a safety net, not a speed test
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert {"device", "torch", "config", "results"} <= set(report)
    cfg, results = report["config"], report["results"]
    assert list(results) == ["none", "echo:2", "echo:4", "cla:2", "att=echo:2"] and cfg["n_layer"] == 8
    shape = ModelConfig(**{k: cfg[k] for k in ModelConfig.__dataclass_fields__ if not k.endswith("_share")})
    base = results["none"]
    for spec, res in results.items():
        kv, att = res["kv_sources"], res["att_sources"]
        n_v = sum(kv[i] == i for i in range(8))                     # layers computing V (and caching it)
        n_k = sum(kv[i] == i and att[i] == i for i in range(8))     # layers computing K
        n_q = sum(att[i] == i for i in range(8))                    # layers computing q
        assert res["kv_bytes_per_token"] == (n_k + n_v) * cfg["n_kv_head"] * shape.head_dim * 4  # fp32
        assert res["kv_bytes_per_token"] / base["kv_bytes_per_token"] == (n_k + n_v) / 16
        assert res["flops_per_token"] == training_flops_per_token(ModelConfig(**{**shape.__dict__, **variant_sharing(spec)}),
                                                                  cfg["block_size"])
        assert res["baseline_flops_per_token"] == base["flops_per_token"]
        for key in ("train_tok_s", "train_ms_per_iter", "prefill_tok_s_b1_short", "decode_tok_s_b1_short",
                    "decode_tok_s_b4_long", "naive_decode_tok_s_b1_short"):
            assert res[key] > 0, key
        # MFU against the matmul peak measured on this CPU; MBU against the peak given on the command line
        assert res["mfu"] == pytest.approx(res["flops_per_token"] * res["train_tok_s"] / report["peaks"]["peak_flops"])
        for batch, context, prompt in [(1, "short", 16), (4, "long", 128 - 16)]:
            name = f"b{batch}_{context}"
            # closed form: fp32 weights read once (tied head, so no embedding rows apart), 2 norms a layer + the
            # final one, and every K and V slot over the whole cache (prompt + 16 decoded tokens)
            d, ff, hd = cfg["n_embd"], shape.intermediate_size, shape.head_dim
            weights = 8 * (d * d + 3 * d * ff) + n_q * d * d + (n_k + n_v) * d * cfg["n_kv_head"] * hd + d * 512 + 17 * d
            step = 4 * weights + 4 * (n_k + n_v) * batch * (prompt + 16) * cfg["n_kv_head"] * hd
            assert res[f"decode_bytes_per_token_{name}"] == step / batch
            assert res[f"decode_mbu_{name}"] == pytest.approx(step / batch * res[f"decode_tok_s_{name}"] / 1e10)
    assert report["peaks"]["flops"].startswith("measured ") and report["peaks"]["bytes"] == "given 10 GB/s"
    assert "MFU against: measured" in r.stdout and "MBU against: given 10 GB/s" in r.stdout
    assert kv_cache_bytes(shape, 1, 1, 4) == base["kv_bytes_per_token"]
    assert "ratio" not in r.stdout and "(0.50x)" in r.stdout  # the table prints ratios to the baseline


def test_bad_preset_is_one_line():
    r = subprocess.run([sys.executable, "bench.py", "--preset=huge"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == "error: unknown preset 'huge': choose from tiny, shakespeare, gpt2-small, tinyllama"
