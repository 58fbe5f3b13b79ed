"""The house's shape, from the source (`ast`, nothing imported): the package's import graph
has no cycle, no library module imports a command (`cli/`), imports run one way through
the folders (foundation -> models -> interop, planning -> data -> sampling -> train ->
app -> cli), no two modules' names differ only by a suffix, and the README's Layout
section lists every module there is and nothing else."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "smartbrush_jax")

# the documented `python -m` paths: they only call their command
SHIMS = {"smartbrush_jax.train.__main__": "smartbrush_jax.cli.train",
         "smartbrush_jax.inpaint": "smartbrush_jax.cli.inpaint",
         "smartbrush_jax.app.__main__": "smartbrush_jax.cli.app", "smartbrush_jax.aot": "smartbrush_jax.cli.aot"}
# a folder may import its own rank and those below it, never above; "" is the top-level modules
RANKS = {"": 0, "models": 1, "interop": 2, "planning": 2, "data": 3, "pytorch": 3, "metrics": 4, "sampling": 4,
         "train": 5, "app": 6, "cli": 7}


def modules() -> dict:
    """{dotted name: path} of every module of the package."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(d, f)
    return out


def import_graph() -> dict:
    """{module: set of package modules it imports}, lazy imports inside functions included."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        deps = set()
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and t.startswith("smartbrush_jax"):
                    deps.add(t)
        graph[name] = deps
    return graph


def folder(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return ""
    return parts[0] if os.path.isdir(os.path.join(PKG, parts[0])) else ""


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checks_catch_what_they_look_for():
    """The cycle finder and the layering rule on a planted graph: each fails where it should."""
    planted = {"smartbrush_jax.a": {"smartbrush_jax.b"}, "smartbrush_jax.b": {"smartbrush_jax.a"},
               "smartbrush_jax.c": set()}
    assert cycles(planted) == [["smartbrush_jax.a", "smartbrush_jax.b"]]
    assert cycles({"smartbrush_jax.a": {"smartbrush_jax.c"}, "smartbrush_jax.c": set()}) == []
    assert upward_arrows({"smartbrush_jax.models.unet": {"smartbrush_jax.train.step"}}) == \
        ["smartbrush_jax.models.unet (models) -> smartbrush_jax.train.step (train)"]
    assert library_to_cli({"smartbrush_jax.data.prepare": {"smartbrush_jax.cli.prepare"}}) == \
        ["smartbrush_jax.data.prepare -> smartbrush_jax.cli.prepare"]


def upward_arrows(graph: dict) -> list:
    bad = []
    for m, deps in graph.items():
        if m in SHIMS:
            continue
        for d in deps:
            a, b = folder(m), folder(d)
            if a != b and (RANKS[b] > RANKS[a] or (RANKS[b] == RANKS[a] and a != "")):
                bad.append(f"{m} ({a or 'top level'}) -> {d} ({b or 'top level'})")
    return sorted(bad)


def library_to_cli(graph: dict) -> list:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if d.startswith("smartbrush_jax.cli") and not m.startswith("smartbrush_jax.cli") and m not in SHIMS)


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_library_module_imports_a_command():
    graph = import_graph()
    assert library_to_cli(graph) == []
    for shim, command in SHIMS.items():  # a shim calls its command and nothing else
        assert graph[shim] == {command}, shim


def test_imports_run_one_way_through_the_folders():
    graph = import_graph()
    assert {folder(m) for m in graph} <= set(RANKS), "a new folder: give it a rank in RANKS"
    assert upward_arrows(graph) == []


def test_no_two_module_names_differ_only_by_a_suffix():
    """`inpaint`/`inpainting`, `train`/`trainer`, `app`/`webapp` told a newcomer nothing
    about which is which. A command and the folder or module of its name are one thing."""
    names = {m.split(".")[-1] for m in modules() if m != "smartbrush_jax" and not m.endswith("__main__")}

    def affix_only(a, b):  # b is a plus a few letters of the same word (ing, er, s; web...)
        rest = b[len(a):] if b.startswith(a) else b[:-len(a)] if b.endswith(a) else None
        return rest is not None and 0 < len(rest) <= 4 and rest.isalpha()

    assert affix_only("inpaint", "inpainting") and affix_only("train", "trainer") and affix_only("app", "webapp")
    assert not affix_only("cli", "clip_score") and not affix_only("config", "absl_config")
    assert sorted((a, b) for a in names for b in names if affix_only(a, b)) == []


def test_readme_layout_lists_the_tree():
    """Every module of the package is in the README's Layout section, and every path there exists."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    m = re.search(r"^## Layout\n(.*?)^## ", text, re.S | re.M)
    assert m, "README.md has no '## Layout' section"
    block = re.search(r"```\n(.*?)```", m.group(1), re.S)
    assert block, "the Layout section has no tree"
    listed, folders = set(), []
    for line in block.group(1).splitlines():
        entry = re.split(r"\s{2,}", line.strip())[0] if line.strip() else ""
        names = [n.strip() for n in entry.split(",") if n.strip()]
        depth = (len(line) - len(line.lstrip())) // 2
        if entry.endswith("/") and "," not in entry:
            folders = folders[:depth] + [entry.rstrip("/")]
        elif names and all(n.endswith(".py") for n in names):  # a row of files (descriptions wrap below)
            listed.update("/".join(folders[:depth] + [n]) for n in names)
    actual = {os.path.relpath(p, ROOT) for p in modules().values() if not p.endswith("__init__.py")}
    missing = sorted(actual - listed)
    stale = sorted(p for p in listed if p.startswith("smartbrush_jax/") and not os.path.exists(os.path.join(ROOT, p)))
    assert missing == [] and stale == []


@pytest.mark.parametrize("module", sorted(SHIMS))
def test_the_documented_python_m_paths_exist(module):
    assert module in modules()


def defined_names(path: str) -> set:
    """Names a module binds at any level (functions, classes, assignments, imports)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = {"__doc__", "__name__", "__file__"}
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                out.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in n.names)
    return out


def unresolved_imports(paths) -> list:
    """`from smartbrush_jax.X import name` where X has no module or binds no `name`: a move
    that missed a caller (a lazy import inside a function fails only when that path runs)."""
    mods = modules()
    bad = []
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith(
                    "smartbrush_jax")):
                continue
            if node.module not in mods:
                bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: no module {node.module}")
                continue
            names = defined_names(mods[node.module])
            for a in node.names:
                if a.name != "*" and a.name not in names and f"{node.module}.{a.name}" not in mods:
                    bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {node.module} has no {a.name}")
    return bad


def python_files():
    for top in ("smartbrush_jax", "tests", "bench", "eval", "launch", "configs"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            yield from (os.path.join(d, f) for f in files if f.endswith(".py"))


def test_every_import_of_the_package_names_something_that_exists(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from smartbrush_jax.checkpoints import load_workdir\n"
                       "from smartbrush_jax.nowhere import x\n")
    assert len(unresolved_imports([str(planted)])) == 2
    assert unresolved_imports(python_files()) == []


def runs_as_main(module: str) -> bool:
    mods = modules()
    if f"{module}.__main__" in mods:
        return True
    if module not in mods or mods[module].endswith("__init__.py"):
        return False
    with open(mods[module]) as f:
        return re.search(r'^if __name__ == "__main__":', f.read(), re.M) is not None


def test_every_documented_python_m_command_runs():
    """Each `python -m smartbrush_jax.X` in the docs, scripts and tests names a module that
    runs something (a `__main__` guard or a package's `__main__.py`), and every command in
    `cli/` can be run that way."""
    found = set()
    for top in ("README.md", "Makefile", "docs", "launch", "bench", "eval", "tests", "smartbrush_jax", "configs"):
        p = os.path.join(ROOT, top)
        paths = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                                               if f.endswith((".py", ".md", ".sh", ".txt"))]
        for path in paths:
            with open(path, errors="replace") as f:
                text = f.read()
            found.update(re.findall(r'-m["\',\s]+(smartbrush_jax(?:\.[a-z_]+)*)(?![.\w])', text))
    assert "smartbrush_jax.cli.latents" in found and "smartbrush_jax.train" in found
    assert sorted(m for m in found if not runs_as_main(m)) == []
    commands = [m for m, p in modules().items() if m.startswith("smartbrush_jax.cli.") and m != "smartbrush_jax.cli"
                and "def main(" in open(p).read()]
    assert sorted(m for m in commands if not runs_as_main(m)) == []
