"""Zero-shot tasks of lm-evaluation-harness (EleutherAI), the harness the papers' tables come from, on any model
this project reads: a train.py checkpoint, hf:DIR or gguf:FILE, converted one-shot by kv_share / att_share.

    python -m tools.eval --init_from=gguf:$SMOL --tasks=hellaswag,arc_easy,piqa          # the tasks' data downloads
    python -m tools.eval --init_from=gguf:$SMOL --att_share=echo:7 --tasks=local_mc --include_path=data/eval_tasks

lm-eval is optional (pip install lm-eval) and imported only here. Its three requests, served by our model:
loglikelihood (multiple choice: each question's context is prefilled once into the layer-aware KV cache and
copied to one row per choice, so only the choices run, a batch at a time), loglikelihood_rolling (perplexity
tasks: windows of the context length), generate_until (one request at a time through the cache, stopping at
the model's end token or a task's stop string).
"""
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from echo.checkpoint import load_checkpoint, model_from_checkpoint
from configurator import DEVICE, check_device, configure, precision, run_main
from echo.conversion import convert_sharing
from echo.generate import generate_tokens, regrow_cache
from echo.tokenizer import bpe_meta, stop_ids, text_encoder, tokenizer_from_meta
from model import UsageError
from echo.pretrained import IMPORTS, import_pretrained

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # optional: main() names the package in one line
    TemplateLM = object


@dataclass
class EvalConfig:
    init_from: str = "resume"       # 'resume' (out_dir/ckpt.pt), 'ckpt:DIR', 'hf:DIR' or 'gguf:FILE'
    out_dir: str = "out"
    kv_share: str = ""              # convert one-shot before evaluating ('' = as the model is)
    att_share: str = ""
    tasks: str = "hellaswag,arc_easy,piqa"
    include_path: str = ""          # a folder of local task YAMLs (offline), e.g. data/eval_tasks
    num_fewshot: int = 0
    limit: int = 0                  # at most this many examples per task (0 = all)
    batch_size: int = 8             # continuations (choices) or windows scored together
    device: str = DEVICE
    dtype: str = "float32"
    json: str = ""                  # write the harness's results here


class HarnessModel(TemplateLM):
    """Our LLaMA (any sharing) as an lm-eval model."""

    def __init__(self, model, meta, batch_size=8):
        super().__init__()
        self.model, self.meta, self.batch_size = model.eval(), meta, batch_size
        self.encode, self.decode = text_encoder(meta), tokenizer_from_meta(meta)[1]
        self.stop = stop_ids(meta)
        self.where = model.tok_embeddings.weight.device  # (the harness's base class owns .device)

    @property
    def eot_token_id(self):
        return self.meta.get("eot") if self.meta.get("eot") is not None else (self.stop or [0])[0]

    @property
    def prefix_token_id(self):  # what an empty context is conditioned on: BOS if the model is given one, else EOT
        return self.meta["bos"] if self.meta.get("bos") is not None else self.eot_token_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.encode(string)

    def tok_decode(self, tokens, **kwargs):
        return self.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """(sum of log-probabilities, whether greedy decoding gives it) of each continuation after its context.
        Requests with the same context are scored together, their context prefilled once."""
        results, groups = [None] * len(requests), {}
        for n, (_, context, continuation) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(n)
        for context, members in groups.items():
            for i in range(0, len(members), self.batch_size):
                chunk = members[i:i + self.batch_size]
                for n, result in zip(chunk, self.score(list(context), [requests[n][2] for n in chunk])):
                    results[n] = result
        return results

    @torch.no_grad()
    def score(self, context, continuations):
        block, longest = self.model.config.block_size, max(map(len, continuations))
        if len(context) + longest > block + 1:  # too long: each one left-truncated on its own, as lm-eval's HF backend
            return [self.score_full([(context + c)[-(block + 1):]], [len(c)])[0] for c in continuations]
        n, C = len(continuations), len(context)
        self.model.setup_cache(1, C + longest - 1)
        first = self.model(self.tensor([context]), input_pos=torch.arange(C, device=self.where))[0]  # (1, 1, V)
        logprobs = [F.log_softmax(first[0, -1].float(), -1)] * n  # what each continuation's first token gets
        rows = [[] for _ in continuations]
        if longest > 1:  # the cache's one row copied to every continuation; then all of them at offset C
            regrow_cache(self.model, n, C + longest - 1)
            fed = self.tensor([c[:-1] + [0] * (longest - len(c)) for c in continuations])  # (n, longest - 1)
            logits = self.model(fed, input_pos=torch.arange(C, C + longest - 1, device=self.where), all_logits=True)[0]
            rows = [F.log_softmax(logits[r].float(), -1) for r in range(n)]  # (longest - 1, V) each
        results = []
        for r, c in enumerate(continuations):
            lp = torch.stack([logprobs[r]] + [rows[r][j] for j in range(len(c) - 1)])  # (len(c), V)
            target = self.tensor(c)
            results.append((lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
        return results

    @torch.no_grad()
    def score_full(self, inputs, lengths):
        """The same for whole token lists (fed: all but the last), scoring each one's last `lengths` tokens."""
        longest = max(map(len, inputs)) - 1
        fed = self.tensor([t[:-1] + [0] * (longest - len(t) + 1) for t in inputs])  # right-padded: causal, harmless
        logits = self.model(fed, all_logits=True)[0]
        results = []
        for r, (tokens, k) in enumerate(zip(inputs, lengths)):
            lp = F.log_softmax(logits[r, len(tokens) - 1 - k:len(tokens) - 1].float(), -1)
            target = self.tensor(tokens[-k:])
            results.append((lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The log-likelihood of whole texts, in windows of the context length (as lm-eval's HF backend)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        block, out = self.model.config.block_size, []
        for (text,) in (req.args for req in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, block, context_len=1)]
            total = 0.0
            for i in range(0, len(windows), self.batch_size):
                chunk = windows[i:i + self.batch_size]
                total += sum(lp for lp, _ in self.score_full([a + b for a, b in chunk], [len(b) for _, b in chunk]))
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm=False):
        """Greedy (or sampled, if the task asks) text after each context, up to the model's end token, a task's
        stop string or max_gen_toks."""
        out = []
        for context, kwargs in (req.args for req in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            max_new = kwargs.get("max_gen_toks", 256)
            ids = self.tok_encode(context)[-(self.model.config.block_size - max_new):]
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0
            new, text = [], ""
            for token in generate_tokens(self.model, self.tensor([ids]), max_new, temperature,
                                         vocab_limit=self.meta["vocab_size"], stop=self.stop):
                if token.item() in self.stop:
                    break
                new.append(token.item())
                text = self.tok_decode(new)
                if any(s in text for s in until):
                    break
            out.append(min((text.split(s)[0] for s in until), key=len) if until else text)
        return out

    def tensor(self, rows):
        return torch.tensor(rows, dtype=torch.long, device=self.where)


def load(cfg):
    """The model init_from names (converted if asked), in cfg.dtype on cfg.device, and its data meta."""
    if cfg.init_from.startswith(IMPORTS):
        model, meta = import_pretrained(cfg.init_from), bpe_meta(cfg.init_from)
    elif cfg.init_from == "resume" or cfg.init_from.startswith("ckpt:"):
        path = os.path.join(cfg.out_dir if cfg.init_from == "resume" else cfg.init_from[5:], "ckpt.pt")
        ckpt = load_checkpoint(path, require=("meta",))
        model, meta = model_from_checkpoint(ckpt, path), ckpt["meta"]
    else:
        raise UsageError(f"init_from={cfg.init_from!r}: expected resume, ckpt:DIR, hf:DIR or gguf:FILE")
    if cfg.kv_share or cfg.att_share:
        model = convert_sharing(model, cfg.kv_share or None, cfg.att_share or None)
    return model.to(device=cfg.device, dtype=precision(cfg.device, cfg.dtype)[0]), meta


def evaluate(cfg):
    """lm-eval's simple_evaluate on our model: its results dict (per task, its metrics)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("eval.py runs lm-evaluation-harness: pip install lm-eval") from None
    check_device(cfg.device)
    if cfg.batch_size < 1 or cfg.limit < 0 or cfg.num_fewshot < 0:
        raise UsageError("batch_size must be at least 1, limit and num_fewshot at least 0")
    if cfg.include_path and not os.path.isdir(cfg.include_path):
        raise UsageError(f"include_path={cfg.include_path}: no such folder of task YAMLs")
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    # the local tasks alone first: indexing lm-eval's thousands of its own takes seconds, needed only for those
    manager = TaskManager(include_path=cfg.include_path, include_defaults=False) if cfg.include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=cfg.include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if not tasks or unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown) or repr(cfg.tasks)}: see lm-eval's task list "
                         f"(lm_eval ls tasks), or give --include_path for local ones")
    model, meta = load(cfg)
    return lm_eval.simple_evaluate(model=HarnessModel(model, meta, cfg.batch_size), tasks=tasks,
                                   num_fewshot=cfg.num_fewshot, limit=cfg.limit or None, task_manager=manager,
                                   log_samples=False)


def main(argv):
    cfg = configure(EvalConfig(), argv)
    results = evaluate(cfg)
    for task, metrics in results["results"].items():
        shown = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"config": vars(cfg) | {"explicit": sorted(cfg.explicit)}, "results": results["results"]},
                      f, indent=1, default=str)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
