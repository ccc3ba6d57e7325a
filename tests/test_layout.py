"""How the code is laid out, checked: the scripts (train, sample, bench, analyze) import the library and never
each other, and no two library modules import each other, directly or around a circle, counting imports made
inside functions too (a lazy import is still a dependency)."""
import ast
import os

from conftest import ROOT

SCRIPTS = {"train", "sample", "bench", "analyze"}


def local_modules():
    """{module name: path} for the top-level modules and data/*.py."""
    found = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    found |= {f"data.{f[:-3]}": os.path.join(ROOT, "data", f) for f in os.listdir(os.path.join(ROOT, "data"))
              if f.endswith(".py")}
    return found


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
    assert SCRIPTS <= set(modules) and {"model", "checkpoint", "conversion", "distill", "data.loader"} <= set(modules)
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
