"""How the code is laid out, checked: the root holds the design's four scripts and configurator.py, beside named
folders; the scripts (train, sample, bench, and tools/ holds scripts only: analyze, eval) import the library (echo/)
and never each other; the library imports no script, no tool and nothing of data/ (whose prepare scripts import it:
the arrow goes one way); and no modules import each other around a circle, counting imports made inside functions
too (a lazy import is still a dependency)."""
import ast
import os
import subprocess

from conftest import ROOT

SCRIPTS = {"train", "sample", "bench", "tools.analyze", "tools.eval"}  # the entry points: nothing imports them
ROOT_FILES = {"model.py", "train.py", "sample.py", "bench.py", "configurator.py"}  # what a student sees first
FOLDERS = {"data", "config", "tests", "echo", "tools", "docs"}


def local_modules():
    """{module name: path} for the root modules, the library echo/, tools/ and data/*.py."""
    found = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for package in ("echo", "tools", "data"):
        found |= {f"{package}.{f[:-3]}": os.path.join(ROOT, package, f)
                  for f in os.listdir(os.path.join(ROOT, package)) if f.endswith(".py") and f != "__init__.py"}
    return found


def test_the_root_is_the_design_four_and_named_folders():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    top = {path.split("/")[0] for path in listed if not path.startswith(".")}
    assert {f for f in top if f.endswith(".py")} == ROOT_FILES
    assert {f for f in top if "/" in next(p for p in listed if p.startswith(f))} == FOLDERS


def test_the_library_never_imports_a_script_a_tool_or_data():
    modules = local_modules()
    for name, path in modules.items():
        if name.startswith("echo.") or name in ("model", "configurator"):
            assert not {m for m in imports_of(path, modules) if m.startswith(("tools.", "data.")) or m in SCRIPTS}, name
    assert {name for name in modules if name.startswith("tools.")} <= SCRIPTS  # tools/ holds scripts, no library


def imports_of(path, modules):
    """The local modules a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        out |= {n for n in names if n in modules}
    return out


def test_no_module_imports_a_script():
    modules = local_modules()
    assert SCRIPTS <= set(modules) and {"model", "echo.checkpoint", "echo.pretrained", "echo.costs", "echo.measure",
                                        "echo.conversion", "echo.distill", "data.loader"} <= set(modules)
    for name, path in modules.items():
        assert not imports_of(path, modules) & SCRIPTS, f"{name} imports the script(s) {imports_of(path, modules) & SCRIPTS}"


def test_there_is_no_import_circle():
    modules = local_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}

    def reaches(start, goal, seen=()):
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, (*seen, nxt))) for nxt in graph[start])

    circles = sorted(name for name in graph if reaches(name, name))
    assert not circles, f"modules on an import circle: {circles}"
    assert graph["model"] == set()  # the model stands alone: everything else builds on it


def defined_names(path):
    """The functions, classes and constants a module defines at its top level."""
    names = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


# one job per file: each idea defined in the module that holds that job, and nowhere else
JOBS = {
    "echo.costs": {"projection_counts", "kv_cache_bytes", "matmul_params", "training_flops_per_token",
                   "decode_bytes_per_step", "step_flops"},                                 # what it costs
    "echo.measure": {"device_peak", "measured_matmul_flops", "measured_read_bytes", "Timer"},  # what the device can do
    "echo.conversion": {"convert_sharing", "adaptation_stages", "enter_stage"},  # the surgery
    "echo.pretrained": {"load_hf_llama", "load_gguf_llama", "gguf_meta", "hf_config", "gguf_config", "import_pretrained",
                   "from_pretrained", "load_pretrained", "HF_NAMES", "GGUF_NAMES", "IMPORTS"},  # weights from elsewhere
    "echo.checkpoint": {"save_checkpoint", "load_checkpoint", "restore_training_state", "rng_state",
                        "resume_checkpoint"},                                               # our checkpoints
}


def test_each_job_lives_in_its_own_module():
    modules = local_modules()
    defined = {name: defined_names(path) for name, path in modules.items()}
    for home, names in JOBS.items():
        assert names <= defined[home], f"{home} lacks {names - defined[home]}"
        for other, there in defined.items():
            assert other == home or not names & there, f"{other}.py defines {names & there}, which is {home}.py's job"
    # the model file is config, sharing specs, pieces, cache and LLaMA: no costs, no surgery, no file formats
    assert {"ModelConfig", "resolve_sources", "projection_sources", "computed_projections", "Attention", "KVCache",
            "LLaMA"} <= defined["model"]


def test_the_sharing_rule_is_written_only_in_model_py():
    """Which layer's q, k, v a layer attends with is model.projection_sources: the modules that count, convert or
    analyse import it from there, none composes the two source lists itself (kv_sources[att_sources[i]]), and
    costs.py imports no conversion code."""
    modules = local_modules()
    for name in ("echo.costs", "echo.conversion", "echo.layer_costs"):
        assert "model" in imports_of(modules[name], modules)
        text = open(modules[name]).read()
        assert "projection_sources" in text or "reads_from" in text  # the rule, or the model's own list of it
    assert "echo.conversion" not in imports_of(modules["echo.costs"], modules)
    for name, path in modules.items():
        text = open(path).read().replace(" ", "")
        composed = "kv_sources[att_sources[" in text or "kv[att[" in text
        assert name == "model" or not composed, f"{name}.py writes its own version of the sharing rule"


def test_data_reads_no_checkpoint_code():
    modules = local_modules()
    for name, path in modules.items():
        if name.startswith("data."):
            assert "echo.checkpoint" not in imports_of(path, modules), f"{name} imports checkpoint"
