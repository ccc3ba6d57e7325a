"""What the scripts show: bench.py's table, and the figures of analyze.py and bench.py (matplotlib is optional,
needed only when a plot is asked for)."""
import math

import numpy as np

from model import UsageError
from echo.measure import device_name
from echo.runlog import sharing


def bench_table(results, cfg, peaks):
    """bench.py's readable rows: each figure and its ratio to the first variant (the baseline)."""
    base = results[next(iter(results))]
    rows = [("params (M)", "params", 1e-6), ("train tok/s", "train_tok_s", 1), ("train ms/iter", "train_ms_per_iter", 1),
            ("MFU % (own FLOPs)", "mfu", 100), ("MFU % (baseline FLOPs)", "mfu_baseline_flops", 100),
            ("train FLOPs/token (G)", "flops_per_token", 1e-9), ("train peak memory GiB", "train_peak_memory_gib", 1),
            ("max micro-batch", "max_micro_batch", 1), ("KV-cache bytes/token", "kv_bytes_per_token", 1),
            ("inference peak mem GiB", "inference_peak_memory_gib", 1),
            ("KD step ms", "distill_step_ms", 1), ("KD: teacher forward ms", "distill_teacher_ms", 1),
            ("KD: student fwd+bwd ms", "distill_student_ms", 1), ("KD: optimizer ms", "distill_optimizer_ms", 1),
            ("KD: teacher share %", "distill_teacher_share", 100), ("KD step tok/s", "distill_tok_s", 1),
            ("KD step MFU %", "distill_mfu", 100), ("KD peak memory GiB", "distill_peak_memory_gib", 1),
            ("eval forward ms/batch", "eval_forward_ms", 1)]
    for k in base:
        if k.startswith("prefill_tok_s_"):
            name = k[len("prefill_tok_s_"):]
            label = name.replace("_", " ")
            rows += [(f"prefill tok/s {label}", k, 1), (f"decode tok/s {label}", f"decode_tok_s_{name}", 1),
                     (f"decode GB/s {label}", f"decode_gb_s_{name}", 1),
                     (f"decode MBU % {label}", f"decode_mbu_{name}", 100)]
    for k in base:
        if k.startswith("ctx_decode_tok_s_"):
            name = k[len("ctx_decode_tok_s_"):]
            batch, context = name.split("_")
            rows += [(f"decode tok/s {batch} ctx {context}", k, 1),
                     (f"decode GB/s {batch} ctx {context}", f"ctx_decode_gb_s_{name}", 1)]
    for k in base:
        if k.startswith("cap_tok_s_"):
            gib, context = k[len("cap_tok_s_"):].split("_")
            rows += [(f"batch in {gib} GiB ctx {context}", f"cap_batch_{gib}_{context}", 1),
                     (f"decode tok/s {gib} GiB ctx {context}", k, 1)]
    if "naive_decode_tok_s_b1_short" in base:
        rows.append(("naive decode tok/s b1 short", "naive_decode_tok_s_b1_short", 1))
    lines = [f"{'':28}" + "".join(f"{spec:>20}" for spec in results)]
    for label, key, scale in rows:
        if base.get(key) is None:
            continue
        cells = []
        for r in results.values():
            val, ratio = r[key] * scale, (r[key] / base[key] if base[key] else float("nan"))
            num = f"{val:,.0f}" if abs(val) >= 1000 else f"{val:.4g}"
            cells.append(f"{num:>12}" + (f" ({ratio:.2f}x)" if r is not base else " " * 8))
        lines.append(f"{label:28}" + "".join(f"{c:>20}" for c in cells))
    head = (f"{cfg.preset}: {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head} heads / {cfg.n_kv_head} KV heads, "
            f"vocab {cfg.vocab_size}, context {cfg.block_size}, batch {cfg.batch_size}, {cfg.dtype}, "
            f"compile={cfg.compile}, {device_name(cfg.device)}\n"
            f"MFU against: {peaks['flops']}; MBU against: {peaks['bytes']}")
    return "\n".join([head] + lines)


def pyplot():
    """matplotlib's pyplot, drawing to files only; matplotlib is needed just for --plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def save_figure(fig, file, dpi):
    fig.tight_layout()
    try:
        fig.savefig(file, dpi=dpi)
    except OSError as e:
        raise UsageError(f"cannot write {file} ({e.strerror})") from None


def stage_starts(records, x):
    """x positions where a layer-wise conversion entered a new stage: right after the old stage's last line."""
    return [a[x] for a, b in zip(records, records[1:]) if b["stage"] != a["stage"]]


def plot_runs(runs, file):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    extra = {}  # eval_datasets: name -> its line style (dashed, -., :), in each run's colour
    for i, run in enumerate(runs):
        color, label = f"C{i}", f"{run['name']} ({sharing(run['evals'][-1])[:20]})"  # a long list: its start
        train = sorted(run["train"], key=lambda r: r["iter"])
        for ax, x in zip(axes, ("tokens", "train_seconds")):
            # with distillation the training loss mixes in the KL: plot its cross-entropy part
            ax.plot([r[x] for r in train], [r.get("ce", r["loss"]) for r in train], color=color, alpha=0.3, lw=1)
            ax.plot([r[x] for r in run["evals"]], [r["val_loss"] for r in run["evals"]], color=color, marker="o",
                    ms=3, lw=1.5, label=label)
            for style, name in zip(("--", "-.", ":"), run["evals"][-1].get("eval_losses", {})):  # eval_datasets
                extra.setdefault(name, "dashed" if style == "--" else style)
                ax.plot([r[x] for r in run["evals"]], [r.get("eval_losses", {}).get(name, math.nan)
                                                      for r in run["evals"]], color=color, ls=style, marker="s", ms=3, lw=1.2)
            for start in stage_starts(train, x):
                ax.axvline(start, color=color, ls=":", lw=1)
    axes[0].set(xlabel="tokens seen", ylabel="loss (line: val; faint: train)")
    axes[1].set(xlabel="training seconds (evals excluded)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    staged = any(stage_starts(sorted(run["train"], key=lambda r: r["iter"]), "iter") for run in runs)
    fig.suptitle("; ".join([f"{style}: {name}" for name, style in extra.items()]
                           + ["dotted: a layer-wise conversion stage begins"] * staged), fontsize=9)
    save_figure(fig, file, dpi=90)
    plt.close(fig)


def plot_layers(kv_cost, att_cost, kv_sim, att_sim, file, title):
    plt = pyplot()
    L = len(kv_cost)
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.5))
    upper = np.triu(np.ones((L, L), dtype=bool), 1)
    ticks = range(0, L, 1 if L <= 12 else 5)
    for ax, m, name, cmap in zip(axes.flat, (kv_cost, att_cost, kv_sim, att_sim),
                                 ("cost: loss rise when j reads i's K/V", "cost: loss rise when j reuses i's attention",
                                  "K/V similarity (cosine)", "attention-map similarity (cosine, EchoAtt's Fig. 2)"),
                                 ("magma_r", "magma_r", "viridis", "viridis")):
        shown = np.ma.masked_where(~upper, m)
        # a few very costly pairs (a layer reading layer 0, say) would wash out the rest: costs are coloured up
        # to their 95th percentile, the few above it in the darkest colour
        top = np.percentile(m[upper], 95) if "cost" in name and L > 12 else None
        im = ax.imshow(shown, cmap=cmap, vmax=top)
        for i, j in zip(*np.nonzero(upper)) if L <= 12 else ():
            r, g, b, _ = im.cmap(im.norm(m[i, j]))
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w")  # readable on its cell
        ax.set(title=name + (" (colour capped at the 95th pct.)" if top is not None else ""), xlabel="reader j",
               ylabel="source i", xticks=ticks, yticks=ticks)
        ax.title.set_fontsize(9)
        fig.colorbar(im, ax=ax, fraction=0.046, extend="max" if top is not None else "neither")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, file, dpi=80)
    plt.close(fig)


def plot_frontier(points, dataset, within, file):
    """Gap to the original against the KV cache saved: a line per kind, after training solid, one-shot dashed
    (runs without a one-shot figure left out), a dotted line at `within` nats."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, kind in zip(("C0", "C1"), ("K/V", "attention")):
        mine = sorted((p for p in points if p["kind"] == kind), key=lambda p: (p["consumers"], p["iters"]))
        trained = {p["consumers"]: p for p in mine if p["iters"] > 0}  # the longest run at each N
        one_shot = {p["consumers"]: p for p in mine if p["one-shot"] is not None}
        for ps, style, label in ((one_shot, "--", "one-shot"), (trained, "-", "after training")):
            ps = sorted(ps.values(), key=lambda p: p["cache saved"])
            if ps:
                ax.plot([100 * p["cache saved"] for p in ps], [p["one-shot" if style == "--" else "after"] for p in ps],
                        ls=style, marker="o", color=color, label=f"{kind} sharing, {label}")
                for p in ps:
                    ax.annotate(str(p["consumers"]), (100 * p["cache saved"], p["one-shot" if style == "--" else "after"]),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(within, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="KV cache saved per token (%)", ylabel=f"{dataset} loss gap to the original (nats)")
    ax.set_title("numbers: layers that share (consumers)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, file, dpi=90)
    plt.close(fig)


def plot_curve(points, trend, targets, title, file, predicted=(), beside=()):
    """analyze.py curve: gap against tokens trained on a log axis (the one-shot point, at 0 tokens, as a line),
    the fitted trend extended to the tokens it predicts for the targets, dotted lines at the targets, and the
    trained points of earlier curves (name, points) beside, thinner."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    trained = [(t, g) for t, g, _ in points if t > 0]
    ax.plot(*zip(*trained), marker="o", color="C0", label="after training")
    for i, (name, earlier) in enumerate(beside):
        ax.plot(*zip(*[(t, g) for t, g, _ in earlier if t > 0]), marker=".", lw=1, color=f"C{i + 2}", label=name)
    for t, g, _ in points:
        if t == 0:
            ax.axhline(g, color="C0", ls="--", lw=0.8, label=f"one-shot ({g:+.3f})")
    if trend:
        end = max([trained[-1][0]] + [p for p in predicted if p])
        xs = np.logspace(np.log10(trained[0][0]), np.log10(end), 50)
        ax.plot(xs, trend[0] + trend[1] * np.log10(xs), color="C1", ls="--",
                label=f"trend: {trend[1] * np.log10(2):+.4f} nats per doubling")
    for g in targets:
        ax.axhline(g, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set(xlabel="tokens trained", ylabel="loss gap to the original (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, file, dpi=90)
    plt.close(fig)


def plot_contexts(results, cfg, contexts, file):
    """bench.py: decode tokens/s and GB/s against the cached context, one panel per batch size, a line per variant."""
    plt = pyplot()
    batches = list(dict.fromkeys((1, cfg.decode_batch)))
    fig, axes = plt.subplots(2, len(batches), figsize=(5.5 * len(batches), 7), squeeze=False)
    for col, batch in enumerate(batches):
        for spec, r in results.items():
            for row, what in enumerate(("tok_s", "gb_s")):
                axes[row, col].plot(contexts, [r[f"ctx_decode_{what}_b{batch}_{c}"] for c in contexts], marker="o",
                                    label=spec)
        axes[0, col].set(title=f"batch {batch}", ylabel="decode tokens/s")
        axes[1, col].set(xlabel="cached context (positions)", ylabel="decode GB/s (weights + KV cache read)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{cfg.preset}: decode speed against context, {device_name(cfg.device)}, {cfg.dtype}", fontsize=9)
    save_figure(fig, file, dpi=90)
    plt.close(fig)


def plot_capacity(results, cfg, contexts, budgets, file):
    """bench.py: decode tokens/s against the KV-cache budget, one panel per context, a line per variant, each point
    at the largest batch that fits (its label)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4), squeeze=False)
    for ax, c in zip(axes[0], contexts):
        for spec, r in results.items():
            ax.plot(budgets, [r[f"cap_tok_s_{b}_{c}"] for b in budgets], marker="o", label=spec)
            for b in budgets:
                ax.annotate(f"{r[f'cap_batch_{b}_{c}']}", (b, r[f"cap_tok_s_{b}_{c}"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set(title=f"{c} positions cached", xlabel="KV-cache budget (GiB); label: batch that fits",
               ylabel="decode tokens/s (all sequences)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{cfg.preset}: decode at a fixed cache budget, {device_name(cfg.device)}, {cfg.dtype}", fontsize=9)
    save_figure(fig, file, dpi=90)
    plt.close(fig)
