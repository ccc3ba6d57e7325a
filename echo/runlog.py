"""What a training run reports, in one place: out_dir/log.jsonl (every log and eval line, read by
analyze.py runs), and on a terminal a progress bar with the ETA and the latest figures (eval lines print above
it), else plain lines (CI, nohup). A loss that is NaN or infinite stops the run here, before a checkpoint."""
import json
import math
import os
import sys

from tqdm import tqdm

from model import UsageError
from echo.costs import kv_cache_bytes


class RunLog:
    def __init__(self, out_dir, max_iters, iter_num, resumed):
        """Make the run's folder (clearing a temp file a crash mid-save left; ckpt.pt itself is whole) and
        open its log: appended to on a resume, else new."""
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UsageError(f"out_dir={out_dir} exists and is not a folder")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create out_dir={out_dir} ({e.strerror})") from None
        if os.path.exists(os.path.join(out_dir, "ckpt.pt.tmp")):
            os.remove(os.path.join(out_dir, "ckpt.pt.tmp"))
        self.out_dir = out_dir
        self.file = open_log(os.path.join(out_dir, "log.jsonl"), iter_num if resumed else None)
        self.bar = tqdm(total=max_iters, initial=iter_num, unit="it", dynamic_ncols=True) if sys.stderr.isatty() else None
        self.say = self.bar.write if self.bar else print
        self.peak = None  # what MFU is against, named once the first figure is logged

    def eval(self, iter_num, losses, state, model):
        """An eval line: train and val loss (no train loss for a dataset prepared for evaluation only), the
        loss on each extra val set (eval_datasets) by its name, and the model's sharing and what it costs
        (parameters, KV-cache bytes per token in bf16), for analyze.py's frontier."""
        check_finite(sum(losses.values()), iter_num, self.out_dir)
        extra = {k: v for k, v in losses.items() if k not in ("train", "val")}
        self.say(f"step {iter_num}: " + ", ".join(f"{k} loss {v:.4f}" for k, v in losses.items()))
        self.write({"iter": iter_num, "train_loss": losses.get("train"), "val_loss": losses["val"],
                    **({"eval_losses": extra} if extra else {}), **state, "kv_sources": model.kv_sources,
                    "att_sources": model.att_sources, "params": model.num_params(),
                    "kv_bytes_per_token": kv_cache_bytes(model.config, 1, 1, bytes_per_element=2)})

    def step(self, iter_num, loss, parts, lr, ms_per_iter, tokens_per_s, mfu, mfu_of, state):
        """A log line: the loss and its parts (ce, kd, hidden when distilling), speed, MFU and what it is against."""
        check_finite(loss, iter_num, self.out_dir)
        self.peak = mfu_of
        if self.bar:
            self.bar.set_postfix_str(f"loss {loss:.4f}" + "".join(f", {k} {v:.4f}" for k, v in parts.items())
                                     + f", {tokens_per_s:,.0f} tok/s"
                                     + (f", mfu {mfu * 100:.1f}% of {mfu_of}" if mfu is not None else ""))
        else:
            print(f"iter {iter_num}: loss {loss:.4f}" + "".join(f", {k} {v:.4f}" for k, v in parts.items())
                  + f", lr {lr:.2e}, {ms_per_iter:.1f} ms/iter, {tokens_per_s:,.0f} tok/s"
                  + (f", mfu {mfu * 100:.1f}% of {mfu_of}" if mfu is not None else "")
                  + (" (with the teacher's forward)" if mfu is not None and "kd" in parts else ""))
        self.write({"iter": iter_num, "loss": loss, **parts, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu,
                    "mfu_of": mfu_of if mfu is not None else None, **state})

    def tick(self):
        if self.bar:
            self.bar.update(1)

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()
        if self.bar:
            self.bar.close()
            if self.peak:
                print(f"mfu is against {self.peak}")


def open_log(path, resume_iter):
    """log.jsonl for appending. On a resume from iteration N, lines past N are dropped (that stretch is
    trained again) and so is the eval at N (it is run and logged again): no line appears twice."""
    if resume_iter is not None and os.path.isfile(path):
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a crash
            if rec.get("iter", 0) < resume_iter or (rec.get("iter") == resume_iter and "val_loss" not in rec):
                keep.append(line)
        with open(path, "w") as f:
            f.writelines(keep)
    return open(path, "a" if resume_iter is not None else "w")


def check_finite(loss, iter_num, out_dir):
    """Stop a diverged run before it writes a NaN checkpoint: the last good one stays."""
    if not math.isfinite(loss):
        raise UsageError(f"the loss is {loss} at iteration {iter_num}: training diverged (try a lower "
                         f"learning_rate, or grad_clip); the last good checkpoint in {out_dir} is kept")


def read_run(folder):
    """A run's log.jsonl as {'name', 'train': log lines, 'evals': eval lines}, checked."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such run folder")
    if not os.path.isfile(path):
        raise UsageError(f"{folder} has no log.jsonl: not a train.py out_dir")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(f"{path}: line {n} is not JSON") from None
    evals = [r for r in records if "val_loss" in r]
    if not evals:
        raise UsageError(f"{path} has no eval line yet")
    if "tokens" not in evals[-1]:
        raise UsageError(f"{path} was written by an older train.py (no tokens or train_seconds): re-run it")
    return {"name": os.path.basename(os.path.normpath(folder)), "folder": folder, "train": [r for r in records if "loss" in r],
            "evals": evals}


def sharing(record):
    """A log line's sharing, e.g. 'echo:2', 'att 0,0,2,2' or 'none'."""
    kv, att = record.get("kv_share", "none"), record.get("att_share", "none")
    return " ".join([kv] * (kv != "none") + [f"att {att}"] * (att != "none")) or "none"
