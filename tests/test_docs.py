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


# ----------------------------------------------------------------------------------------------------
# Pointers: every file, section and function a doc or a comment names exists

def project_files(suffixes, skip=()):
    """The repository's files with these suffixes, outside the folders `skip`."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "out")) and d not in ("__pycache__", *skip)]
        out += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith(suffixes)]
    return sorted(out)


PLACEHOLDERS = {"script.py", "config.py", "config_file.py"}  # `script.py [config.py] --key=value` in usage lines
FILE_TYPES = {"py", "md", "bin", "json", "jsonl", "pt", "txt", "gz", "npz", "png"}  # `train.bin` is a file's name
NOT_OURS = {"tokenizer.chat_template"}  # a GGUF metadata key, not echo/tokenizer.py's
DOCS = {"README": "README.md", "RESULTS": "docs/RESULTS.md", "GUIDE": "docs/GUIDE.md"}


def headings(doc):
    return [re.sub(r"^#+\s*", "", line).strip() for line in open(os.path.join(ROOT, doc)) if line.startswith("#")]


def anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_every_file_section_and_function_named_exists():
    # the tests are not read: they name missing files on purpose
    texts = {f: open(os.path.join(ROOT, f), encoding="utf-8").read() for f in project_files((".py", ".md"), ["tests"])}
    every = set(project_files(("",)))
    basenames = {os.path.basename(f) for f in every}
    broken = []
    for where, text in texts.items():
        for m in re.finditer(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", text):  # markdown links, with their anchors
            path, tag = m.groups()
            if path.startswith(("http:", "https:")):
                continue
            target = os.path.normpath(os.path.join(os.path.dirname(where), path)) if path else where
            if target not in every and not os.path.isdir(os.path.join(ROOT, target)):
                broken.append(f"{where}: link to {path}")
            elif tag and target.endswith(".md") and tag[1:] not in map(anchor, headings(target)):
                broken.append(f"{where}: no section {tag} in {target}")
        for m in re.finditer(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.(?:py|md))\b", text):  # file names
            name = m.group(1)
            found = (name in every or os.path.normpath(os.path.join(os.path.dirname(where), name)) in every
                     if "/" in name else name in basenames | PLACEHOLDERS)
            if not found:
                broken.append(f"{where}: file {name}")
        for m in re.finditer(r'\b(README|RESULTS|GUIDE)(?:\.md)?(?:\'s)?[ ,(]{1,3}"([^"\n]{4,100})"', text):
            if not any(m.group(2).lower() in h.lower() for h in headings(DOCS[m.group(1)])):  # quoted sections
                broken.append(f"{where}: no section \"{m.group(2)}\" in {DOCS[m.group(1)]}")
        if where.endswith(".md"):  # `module.name` in the docs: defined in that module
            for module, name in re.findall(r"`([a-z_]+)\.([A-Za-z_]\w*)(?:\(\))?`", text):
                sources = [f for f in every if f.endswith(f"/{module}.py") or f == f"{module}.py"]
                if sources and name not in FILE_TYPES and f"{module}.{name}" not in NOT_OURS and not any(
                        re.search(rf"^\s*(def|class) {name}\b|^{name}\s*=", texts.get(f, ""), re.M) for f in sources):
                    broken.append(f"{where}: {module}.{name} is not defined in {', '.join(sources)}")
    assert not broken, "\n".join(broken)
