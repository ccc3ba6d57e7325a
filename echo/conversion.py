"""Converting a model to K/V or attention sharing, the whole story in one place: the surgery (convert_sharing)
and the schedule that applies it while a model trains.

One shot: `--kv_share=SPEC` / `--att_share=SPEC` on a loaded model converts it before training starts
(convert_on_load). Layer-wise, our reconstruction of ECHO's "gradually converting pretrained LLaMA":
`--kv_share_target=SPEC` / `--att_share_target=SPEC` convert the target's consumers from the top layer down,
1, then 2, 4, ... of them, `adapt_iters` iterations per stage, then fine-tune the whole model to max_iters.
The schedule is plain data (adaptation_stages), saved in every checkpoint, so a resume continues it exactly.
"""
import types
from collections import Counter
from dataclasses import replace

import torch

from model import LLaMA, UsageError, resolve_sharing


# ----------------------------------------------------------------------------------------------------
# The surgery: a model with other specs and the same weights

def convert_sharing(model, kv_share=None, att_share=None, kv_init="keep"):
    """A new model with these specs (None: as `model` has it) and the weights of `model`. Layers that become
    consumers lose the projections they no longer use. A layer that computes a projection starts with the one
    it used so far ('keep': its own, or its old source's), or for K/V with kv_init='mean' the mean of what
    every consumer that will read it used (as MLKV and LCKV initialise a shared projection)."""
    if kv_init not in ("keep", "mean"):
        raise UsageError(f"kv_init={kv_init!r}: expected 'keep' or 'mean'")
    config = replace(model.config, kv_share=model.config.kv_share if kv_share is None else kv_share,
                     att_share=model.config.att_share if att_share is None else att_share)
    weight = model.tok_embeddings.weight
    with torch.device(weight.device):
        new = LLaMA(config).to(weight.dtype)
    old, state = model.state_dict(), {}
    for name in new.state_dict():
        parts = name.split(".")  # layers.{i}.attention.{w}.weight
        if parts[0] != "layers" or parts[3] not in ("wq", "wk", "wv"):
            state[name] = old[name]
            continue
        i, p = int(parts[1]), parts[3][1]
        # the layers this projection starts from: i, and with 'mean' each layer that will read it: for values
        # every reader; for keys only readers with queries of their own (a K/V consumer of i; an attention
        # consumer pairs i's keys with i's queries, so it has no keys of its own to give), and i's own as 'keep'
        # where no reader has (keys that meet another layer's queries). From the rule.
        users = [j for j, src in enumerate(new.reads_from) if src[p] == i and (p == "v" or src["q"] == j)] or [i] \
            if kv_init == "mean" and p != "q" else [i]
        # one vote per user for the projection it attended with so far, counted per source (so that a single
        # source is copied exactly, not re-averaged in floats, and staged 'mean' ends where one-shot 'mean' does)
        votes = Counter(model.reads_from[j][p] for j in users)
        used = [(old[f"layers.{o}.attention.w{p}.weight"], n) for o, n in votes.items()]
        state[name] = used[0][0].clone() if len(used) == 1 else sum(t * n for t, n in used) / len(users)
    new.load_state_dict(state)
    return new


# ----------------------------------------------------------------------------------------------------
# The schedule: one shot on load, or layer by layer while training


def convert_on_load(model, cfg):
    """The one-shot conversion a fine-tune asks for: kv_share / att_share given explicitly (on the command line
    or in a config file); a spec not given keeps the sharing the model has. A layer-wise target converts in
    stages instead, so it leaves the model as it is."""
    if cfg.kv_share_target or cfg.att_share_target:
        return model
    specs = {k: getattr(cfg, k) if k in cfg.explicit else getattr(model.config, k) for k in ("kv_share", "att_share")}
    wanted = resolve_sharing(types.SimpleNamespace(**specs, n_layer=model.config.n_layer))
    if (model.kv_sources, model.att_sources) == wanted:
        return model
    return convert_sharing(model, **specs, kv_init=cfg.kv_init)


def adaptation_stages(start, kv_target="", att_target="", trainable="all"):
    """The layer-wise conversion schedule as plain data: a list of stages, each a dict with the model's
    kv_sources and att_sources during the stage and what trains in it ("trainable", one of TRAINABLE: the run's
    `trainable`, except that 'stages:X' trains X in the adaptation stages and everything in the final one).

    The target's consumers (every layer that reads another layer's K/V or attention in it, including any that
    are consumers in start already) are converted from the top layer down: 1, then 2, 4, ... of them in all (each
    stage keeps the conversions before it), the last adaptation stage all of them; then a final entry, the
    full fine-tuning at the target. E.g. echo:7 on 30 layers (layers 23-29 read layer 22):
        stage 0: 29<-22    stage 1: 28,29<-22    stage 2: 26-29<-22    stage 3: 23-29<-22    final: as stage 3
    start: the model's {"kv_sources", "att_sources"}; a target not given keeps the start's sharing of that
    kind. A layer not yet converted keeps its sources from start, except that what it computes in the target
    it computes from the first stage on (in a model that already shares, a target source may be a consumer,
    and a converted layer must read a layer that computes)."""
    if not (kv_target or att_target):  # nothing to convert: one stage, the model as it is
        return [{"kv_sources": start["kv_sources"], "att_sources": start["att_sources"],
                 "trainable": stage_trainable(trainable, final=True)}]
    n = len(start["kv_sources"])
    specs = {key: target or ",".join(map(str, start[f"{key}_sources"]))
             for key, target in (("kv", kv_target), ("att", att_target))}
    kv, att = resolve_sharing(types.SimpleNamespace(kv_share=specs["kv"], att_share=specs["att"], n_layer=n))
    target = {"kv_sources": kv, "att_sources": att}
    consumers = [i for i in reversed(range(n)) if kv[i] != i or att[i] != i]  # the target's, top first
    counts, c = [], 1  # how many of them are converted in each stage: 1, 2, 4, ..., all
    while c < len(consumers):
        counts.append(c)
        c *= 2
    counts += [len(consumers)] if consumers else []

    def make_stage(converted, final):
        sources = {}
        for key in target:
            sources[key] = []
            for i in range(n):
                if i in converted or target[key][i] == i:  # as in the target (a target source computes its own)
                    sources[key].append(target[key][i])
                else:                                      # not converted yet: as the model started
                    sources[key].append(start[key][i])
        return sources | {"trainable": stage_trainable(trainable, final)}

    return [make_stage(consumers[:c], final=False) for c in counts] + [make_stage(consumers, final=True)]


def describe_stage(stage, previous):
    """The layers a stage converts beyond `previous` and what they read, e.g. '26,27<-22 K/V' (layers 26 and 27
    read layer 22's K/V) or '5<-3 attention'; 'no layer' if none."""
    changed = []
    for key, kind in (("kv_sources", "K/V"), ("att_sources", "attention")):
        by_source = {}
        for i, (src, before) in enumerate(zip(stage[key], previous[key])):
            if src != before:
                by_source.setdefault(src, []).append(str(i))
        changed += [f"{','.join(layers)}<-{src} {kind}" for src, layers in by_source.items()]
    return "; ".join(changed) or "no layer"


def describe_run(model, stages, adapt_iters):
    """The model's consumers, e.g. 'model: 134.52M params, consumers: 23,...,29<-22 K/V', and a layer-wise
    conversion's stages, each against the one before it (the first against every layer its own source)."""
    plain = {key: list(range(len(model.layers))) for key in ("kv_sources", "att_sources")}
    line = (f"model: {model.num_params() / 1e6:.2f}M params, consumers: "
            f"{describe_stage({'kv_sources': model.kv_sources, 'att_sources': model.att_sources}, plain)}")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trained < model.num_params():
        line += f"; {trained:,} of them train"
    if len(stages) > 1:
        line += (f"\nlayer-wise conversion: {len(stages) - 1} stages of {adapt_iters} iterations, then full fine-tuning; "
                 + " | ".join(f"stage {n}: {describe_stage(st, before)}"
                              for n, (st, before) in enumerate(zip(stages[:-1], [plain] + stages))))
    return line


def run_stages(model, cfg, ckpt):
    """The stages of this run: a resumed run's own (saved in its checkpoint, older formats included), else
    built from the model as loaded, the targets and what trains."""
    if ckpt and ckpt.get("adapt_stages"):
        return legacy_stages(ckpt["adapt_stages"], model.config.n_layer, cfg.trainable)
    return adaptation_stages({"kv_sources": model.kv_sources, "att_sources": model.att_sources},
                             cfg.kv_share_target, cfg.att_share_target, cfg.trainable)


def legacy_stages(stages, n_layer, trainable):
    """Stages as this version writes them, from a checkpoint's: before attention sharing only the adaptation
    stages' kv_sources were stored; before `trainable` said what trains in each stage, a flag ("freeze") said
    whether the adaptation stages trained only the converted layers (the run's trainable, restored on resume,
    says it now: checkpoint.resume_checkpoint)."""
    if stages and isinstance(stages[0], dict) and "trainable" in stages[0]:
        return stages
    if not isinstance(stages[0], dict):
        stages = [{"kv_sources": s, "att_sources": list(range(n_layer))} for s in stages] + \
                 [{"kv_sources": stages[-1], "att_sources": list(range(n_layer))}]
    return [{"kv_sources": st["kv_sources"], "att_sources": st["att_sources"],
             "trainable": stage_trainable(trainable, final=n == len(stages) - 1)} for n, st in enumerate(stages)]


def stage_num_at(iter_num, stages, adapt_iters):
    """The number of the stage iteration iter_num trains in: adapt_iters each, the last (full fine-tuning) to the
    end. (A stage itself is a dict, adaptation_stages' entry; a run names its stage by number.)"""
    final = len(stages) - 1
    return min(iter_num // adapt_iters, final) if adapt_iters else final


def resumed_stage_num(ckpt, iter_num, stages, adapt_iters):
    """The stage a resumed run's model and optimizer state belong to. Usually stage_num_at(iter_num), but a
    checkpoint written at the first eval of a new stage was saved before the model entered it (the switch
    happens just after the eval), so it records the old stage, and the run re-enters the new one after it."""
    return ckpt.get("stage", stage_num_at(iter_num, stages, adapt_iters)) if ckpt else stage_num_at(iter_num, stages, adapt_iters)


# What trains: everything, or only the consumers (every layer that reads another's projection) and the projections
# they read: the consumers' whole layers, their attention projections (SwiftKV's choice), or those and their norms.
TRAINABLE = ("all", "layers", "attention", "attention+norms")
ONLY_IN_STAGES = "stages:"  # 'stages:X': X trains in a layer-wise conversion's stages, everything in the final one


def check_trainable(trainable, layer_wise):
    """One line for a `trainable` that is not one of TRAINABLE or stages:X (X one of them, not all), or that
    limits stages a run without a layer-wise target does not have."""
    if trainable.startswith(ONLY_IN_STAGES):
        if trainable[len(ONLY_IN_STAGES):] not in TRAINABLE[1:]:
            raise UsageError(f"trainable={trainable!r}: expected stages: followed by one of {', '.join(TRAINABLE[1:])}")
        if not layer_wise:
            raise UsageError(f"trainable={trainable!r} says what trains during a layer-wise conversion's stages: give "
                             f"kv_share_target or att_share_target, or name what trains the whole run")
    elif trainable not in TRAINABLE:
        raise UsageError(f"trainable={trainable!r}: expected one of {', '.join(TRAINABLE)}, or stages:X (X trains "
                         f"only during a layer-wise conversion's stages)")


def stage_trainable(trainable, final):
    """What trains in one stage (one of TRAINABLE) when the run's setting is `trainable`."""
    if trainable.startswith(ONLY_IN_STAGES):
        return "all" if final else trainable[len(ONLY_IN_STAGES):]
    return trainable


def enter_stage(model, stage, kv_init):
    """Convert the model to the stage's sources (if it is not there yet) and set what trains in it (the stage's
    "trainable"). The caller makes a fresh optimizer for the new parameters; the learning rate follows the run's
    one schedule (warmup and decay over all iterations), so a stage does not re-warm it."""
    if (model.kv_sources, model.att_sources) != (stage["kv_sources"], stage["att_sources"]):
        model = convert_sharing(model, ",".join(map(str, stage["kv_sources"])),
                                ",".join(map(str, stage["att_sources"])), kv_init)
    trainable, sources = stage["trainable"], model.reads_from
    # every consumer (a layer that reads a projection of another), including any that already was when loaded
    consumers = {i for i, src in enumerate(sources) if any(s != i for s in src.values())}
    trained = {f"layers.{sources[i][p]}.attention.w{p}." for i in consumers for p in "qkv"}  # what they read
    parts = {"layers": ("",), "attention": ("attention.",), "attention+norms": ("attention.", "attention_norm.", "ffn_norm.")}
    trained |= {f"layers.{i}.{part}" for i in consumers for part in parts.get(trainable, ())}
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or any(name.startswith(t) for t in trained))
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"trainable={trainable!r} trains only consumers and what they read, and this model has no consumer")
    return model
