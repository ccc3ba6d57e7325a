"""The library train.py, sample.py and bench.py import (model.py, beside them, is the model itself). Read in this
order: conversion.py (turning a model into one that shares), distill.py (learning from the model it was),
generate.py (prefill and the cached decode step), chat.py, then the bookkeeping: checkpoint.py (ours),
pretrained.py (Hugging Face and GGUF weights), costs.py (what a model computes and reads), measure.py (what the
device can do), runlog.py (a run's log)."""
