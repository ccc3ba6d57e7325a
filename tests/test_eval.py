"""eval.py: lm-evaluation-harness on our models. The context-sharing scorer equals a plain full pass (plain and
sharing models, uneven sizes), rolling and generation requests do what the harness asks, and on the real
SmolLM2 (when installed) the local task's per-choice log-likelihoods equal lm-eval's own Hugging Face backend."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import bpe_tokenizer, run_script, write_gguf
from model import LLaMA, ModelConfig

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install lm-eval")
from tools.eval import HarnessModel  # noqa: E402
from echo.pretrained import gguf_meta, import_pretrained  # noqa: E402

OFFLINE = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 5-layer GQA model with uneven sizes, as a GGUF file with its tokenizer (block 40: windows roll)."""
    torch.manual_seed(0)
    tok = bpe_tokenizer()
    model = LLaMA(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=40, n_layer=5, n_head=6, n_kv_head=2,
                              n_embd=60, intermediate_size=70))
    path = tmp_path_factory.mktemp("eval") / "tiny.gguf"
    write_gguf(path, model, tokenizer=tok)
    return str(path)


def request(*args):
    return SimpleNamespace(args=args)


@pytest.mark.parametrize("sharing", [{}, {"kv_share": "0,1,1,3,1"}, {"att_share": "0,1,2,2,1"},
                                     {"kv_share": "0,0,2,3,4", "att_share": "0,1,2,1,1"}],
                         ids=["plain", "kv", "att", "att-source-reads-kv"])
def test_shared_context_scoring_equals_a_full_pass(tiny, sharing):
    lm = HarnessModel(import_pretrained(f"gguf:{tiny}", **sharing), gguf_meta(tiny), batch_size=3)
    g = torch.Generator().manual_seed(1)
    context = torch.randint(0, 300, (13,), generator=g).tolist()
    choices = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 4, 2, 7, 3)]  # 2 batches of 3
    shared = lm._loglikelihood_tokens([(("", ""), context, c) for c in choices])
    with torch.no_grad():
        for (lp, greedy), c in zip(shared, choices):
            logits = lm.model(torch.tensor([context + c[:-1]]), all_logits=True)[0][0, len(context) - 1:]
            logprobs = F.log_softmax(logits.float(), -1)
            assert lp == pytest.approx(logprobs.gather(-1, torch.tensor(c)[:, None]).sum().item(), abs=1e-4)
            assert greedy == bool((logprobs.argmax(-1) == torch.tensor(c)).all())
    # a continuation the model would pick greedily is reported as greedy
    with torch.no_grad():
        best = lm.model(torch.tensor([context]))[0][0, -1].argmax().item()
    assert lm._loglikelihood_tokens([(("", ""), context, [best])])[0][1]
    # past the context window the inputs are left-truncated, each on its own
    long = torch.randint(0, 300, (38,), generator=g).tolist()
    (lp, _), = lm._loglikelihood_tokens([(("", ""), long, choices[3])])
    assert lp == pytest.approx(lm.score_full([(long + choices[3])[-41:]], [7])[0][0], abs=1e-5)


def test_rolling_loglikelihood_covers_every_token_once(tiny):
    lm = HarnessModel(import_pretrained(f"gguf:{tiny}"), gguf_meta(tiny), batch_size=2)
    text = "Where is the love of the king; give me the sword of the night. " * 3  # > 40 tokens: windows roll
    tokens = lm.tok_encode(text)
    assert len(tokens) > 80
    (total,) = lm.loglikelihood_rolling([request(text)])
    def logprob(fed, targets):  # of the targets, predicted by the last len(targets) positions of fed
        logits = lm.model(torch.tensor([fed]), all_logits=True)[0][0, -len(targets):]
        return F.log_softmax(logits.float(), -1).gather(-1, torch.tensor(targets)[:, None]).sum().item()

    with torch.no_grad():  # by hand: the first 40 tokens after the prefix token, then each next (up to) 40 tokens
        expected, end = logprob([lm.prefix_token_id] + tokens[:39], tokens[:40]), 40  # with the 40 before them
        while end < len(tokens):
            n = min(40, len(tokens) - end)
            expected, end = expected + logprob(tokens[end + n - 41:end + n - 1], tokens[end:end + n]), end + n
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_stops_at_a_stop_string(tiny):
    lm = HarnessModel(import_pretrained(f"gguf:{tiny}"), gguf_meta(tiny))
    (free,) = lm.generate_until([request("Give me the", {"until": [], "max_gen_toks": 12})])
    assert free and len(lm.tok_encode(free)) <= 12
    cut = free[len(free) // 2:][:2]  # a string the free text contains
    (stopped,) = lm.generate_until([request("Give me the", {"until": [cut], "max_gen_toks": 12})])
    assert stopped == free.split(cut)[0]


@pytest.mark.parametrize("args,match", [
    (["--tasks=no_such_task", "--include_path=data/eval_tasks"], "unknown task(s) no_such_task"),
    (["--tasks=local_mc", "--include_path=/no/such"], "include_path=/no/such: no such folder"),
    (["--init_from=nonsense", "--tasks=local_mc", "--include_path=data/eval_tasks"], "init_from='nonsense'"),
])
def test_bad_input_is_one_line(args, match, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    r = run_script("-m", "tools.eval", *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr and match in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_missing_harness_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where it is not installed
    r = run_script("-m", "tools.eval", "--tasks=local_mc")
    assert r.returncode == 1 and r.stderr.strip() == "error: eval.py runs lm-evaluation-harness: pip install lm-eval"
