"""The commands the README and the scripts' docstrings show are commands that work: every --key is a real
setting of its script, every config file exists, and a torchrun line splits its accumulation evenly."""
import ast
import os
import re
import shlex
from dataclasses import fields

import pytest

from tools.analyze import CurveConfig, FrontierConfig, LayersConfig, RunsConfig
from bench import BenchConfig
from configurator import configure
from conftest import ROOT
from tools.eval import EvalConfig
from sample import SampleConfig
from train import TrainConfig

SETTINGS = {"train.py": {f.name for f in fields(TrainConfig)}, "sample.py": {f.name for f in fields(SampleConfig)},
            "bench.py": {f.name for f in fields(BenchConfig)}, "tools.eval": {f.name for f in fields(EvalConfig)},
            "tools.analyze": {f.name for c in (RunsConfig, LayersConfig, FrontierConfig, CurveConfig) for f in fields(c)},
            "data/shakespeare_char/prepare.py": {"input", "out_dir"},
            "data/shakespeare/prepare.py": {"input", "out_dir", "tokenizer"},
            "data/tinystories/prepare.py": {"input", "out_dir", "tokenizer"},
            "data/wikitext2/prepare.py": {"input", "out_dir", "tokenizer"},
            "data/teacher_text/prepare.py": {"teacher", "tokens", "out_dir", "batch_size", "max_new_tokens", "top_p",
                                             "seed", "ship", "device"}}
SCRIPT_FILES = {s: s if s.endswith(".py") else s.replace(".", "/") + ".py" for s in SETTINGS}  # tools.x: tools/x.py
SOURCES = ["README.md", "docs/RESULTS.md", "docs/GUIDE.md"] + list(SCRIPT_FILES.values())


def documented_commands():
    """(where, script, argv after the script) for every command line in the README and the docstrings."""
    out = []
    for source in SOURCES:
        text = open(os.path.join(ROOT, source)).read()
        if source.endswith(".py"):
            text = ast.get_docstring(ast.parse(text)) or ""
        else:  # the README's and RESULTS.md's code blocks; a shell variable P="..." holds train.py settings
            text = "\n".join(re.findall(r"```sh\n(.*?)```", text, re.S))
            text = re.sub(r'^P="(.*)"$', r"python train.py \1", text, flags=re.M)
        for line in text.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                if not part.strip().startswith(("python", "torchrun", ".venv/bin/python")):
                    continue  # prose, not a command
                words = shlex.split(part.split("#")[0].replace("$P", ""))
                for i, w in enumerate(words):
                    script = w.removeprefix(".venv/bin/")
                    if script in SETTINGS:
                        out.append((f"{source}: {part.strip()}", script, words, words[i + 1:]))
    return out


COMMANDS = documented_commands()


def test_moved_scripts_are_run_as_modules():
    """tools/ scripts import the library from the root, so they run as `python -m tools.NAME` from it."""
    for source in SOURCES:
        text = open(os.path.join(ROOT, source)).read()
        assert not re.search(r"python3? (tools/)?(analyze|eval|peer|plotting)\.py", text), source


def test_the_docs_show_commands_for_every_script():
    assert {script for _, script, _, _ in COMMANDS} == set(SETTINGS) and len(COMMANDS) > 25


@pytest.mark.parametrize("where,script,words,argv", COMMANDS, ids=[c[0][:90] for c in COMMANDS])
def test_documented_command_uses_real_settings(where, script, words, argv):
    for arg in argv:
        if arg.startswith("--"):
            key = arg[2:].split("=")[0]
            assert key in SETTINGS[script], f"{where}: --{key} is not a setting of {script}"
        elif arg.endswith(".py"):
            assert os.path.isfile(os.path.join(ROOT, arg)), f"{where}: {arg} does not exist"
    if script == "train.py":
        cfg = configure(TrainConfig(), [a for a in argv if not a.startswith("--init_from=hf:")])
        nproc = next((int(w.split("=")[1]) for w in words if w.startswith("--nproc_per_node=")), 1)
        assert cfg.gradient_accumulation_steps % nproc == 0, f"{where}: accumulation not divisible by {nproc}"
