"""The library train.py, sample.py, bench.py and the tools import (model.py, beside them, is the model itself). Read
in this order: conversion.py (turning a model into one that shares), distill.py (learning from the model it was),
generate.py (prefill and the cached decode step), chat.py, tokenizer.py, then the bookkeeping: checkpoint.py
(ours), pretrained.py (Hugging Face and GGUF weights), costs.py (what a model computes and reads), measure.py (what
the device can do, how long things take), layer_costs.py (which layers can share, measured one-shot), peer.py
(gpt-fast beside us), report.py (bench's table, the figures), runlog.py (a run's log). It imports nothing of
data/ or tools/: their scripts import it."""
