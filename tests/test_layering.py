"""Layering (docs/ARCHITECTURE.md, "What imports what"), read from the source with `ast`;
no project module is imported.

1. kernels/ imports only the standard library, NumPy, Numba (with llvmlite, Numba's code
   generator, which simd.py drives), CuPy and its own modules; reference/ only the standard
   library, NumPy and its own modules. An absolute import of `metacore` (even of the
   folder's own installed name) or a relative import that climbs out of the folder fails.
2. The module names that kernels/ and reference/ hold as strings (the backend registries,
   loaded with importlib on request) name modules of kernels/ or reference/ only.
3. No import cycles among the modules of metacore/, kernels/ and reference/. Every import
   statement counts, the ones inside functions too: a lazy import defers a circle to the
   first call, it does not remove it. A module is not counted as importing its own
   package (Python runs a package's __init__ before its submodules; that edge is always
   there and only a circle through an explicit import is a design problem).
4. Importing `metacore` runs nothing of the project: metacore/__init__.py imports only the
   standard library and loads no module by hand (no importlib loaders, no sys.modules).
"""
import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Third-party packages each leaf folder may import, besides the standard library.
LEAF_ALLOWED = {
    "kernels": {"numpy", "numba", "llvmlite", "cupy"},
    "reference": {"numpy"},
}
STDLIB = set(sys.stdlib_module_names)
MODULE_STRING = re.compile(r"^metacore(\.[A-Za-z_][A-Za-z0-9_]*)+$")


# ---------------------------------------------------------------- the module map
def source_roots():
    """{import name: folder} from setup.py's ROOTS (the one place that maps them)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "ROOTS"):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no ROOTS = {...} mapping")


def modules():
    """{module name: (path, is_package)} for every .py file under the source roots."""
    found = {}
    for import_root, folder in source_roots().items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            rel = os.path.relpath(dirpath, base)
            pkg = import_root if rel == "." else import_root + "." + rel.replace(os.sep, ".")
            for f in sorted(filenames):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                if f == "__init__.py":
                    found[pkg] = (path, True)
                else:
                    found[pkg + "." + f[:-3]] = (path, False)
    return found


def _resolve_relative(name, is_package, level, module):
    """The absolute name of `from <level dots><module> import ...` in module `name`, or None
    when it climbs above the top-level package."""
    parts = name.split(".") if is_package else name.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        return None
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name, path, is_package):
    """[(lineno, imported name as written or resolved, level, names imported from it)] for
    every import statement in the file, function-local ones included."""
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, alias.name, 0, ()))
        elif isinstance(node, ast.ImportFrom):
            names = tuple(a.name for a in node.names)
            if node.level:
                target = _resolve_relative(name, is_package, node.level, node.module)
                out.append((node.lineno, target, node.level, names))
            else:
                out.append((node.lineno, node.module, 0, names))
    return out


def edges(mods):
    """{module: {imported project module: first line}}: `from P import x` counts as an
    import of P.x when that is a module, else of P; `import a.b.c` of the longest project
    module among a.b.c, a.b, a."""
    graph = {}
    for name, (path, is_pkg) in mods.items():
        out = graph.setdefault(name, {})
        for line, target, _, names in imports_of(name, path, is_pkg):
            if target is None:
                continue
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            if len(hits) < len(names) or not names:
                parts = target.split(".")
                while parts and ".".join(parts) not in mods:
                    parts.pop()
                if parts:
                    hits.append(".".join(parts))
            for hit in hits:
                if hit != name:
                    out.setdefault(hit, line)
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def strongconnect(start):
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def _leaf_modules(folder):
    mods = modules()
    root = {f: r for r, f in source_roots().items()}[folder]
    return root, {n: v for n, v in mods.items() if n == root or n.startswith(root + ".")}


# ---------------------------------------------------------------- the tests
def test_source_roots_cover_the_three_folders():
    assert source_roots() == {"metacore": "metacore", "metacore.kernels": "kernels",
                              "metacore.reference": "reference"}
    assert "metacore.kernels.mlp_maml" in modules() and "metacore.reference.model" in modules()


def _leaf_violations(folder):
    root, mods = _leaf_modules(folder)
    allowed = STDLIB | LEAF_ALLOWED[folder]
    bad = []
    for name, (path, is_pkg) in sorted(mods.items()):
        rel = os.path.relpath(path, ROOT)
        for line, target, level, _ in imports_of(name, path, is_pkg):
            if level:
                if target is None or not (target == root or target.startswith(root + ".")):
                    bad.append(f"{rel}:{line}: relative import climbs out of {folder}/ "
                               f"(to {target})")
            elif target.split(".")[0] == "metacore":
                bad.append(f"{rel}:{line}: imports {target} (use a relative import for "
                           f"{folder}/'s own modules; nothing else of metacore)")
            elif target.split(".")[0] not in allowed:
                bad.append(f"{rel}:{line}: imports {target}, not among "
                           f"{sorted(LEAF_ALLOWED[folder])} or the standard library")
    return bad


def test_kernels_import_only_numpy_numba_cupy_and_themselves():
    bad = _leaf_violations("kernels")
    assert not bad, "\n".join(bad)


def test_reference_imports_only_numpy_and_itself():
    bad = _leaf_violations("reference")
    assert not bad, "\n".join(bad)


def _module_strings(path):
    """String constants shaped like a metacore module name, docstrings left out."""
    tree = ast.parse(open(path).read(), path)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                     ast.Constant):
                docstrings.add(id(body[0].value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and MODULE_STRING.match(node.value)]


def test_module_names_held_by_the_leaves_stay_in_the_leaves():
    """kernels' backend registries name modules that importlib loads on request: their own
    backends and, for backend='reference', the reference module of the family."""
    mods = modules()
    leaves = ("metacore.kernels", "metacore.reference")
    bad = []
    for folder in ("kernels", "reference"):
        _, own = _leaf_modules(folder)
        for name, (path, _) in sorted(own.items()):
            for line, value in _module_strings(path):
                if value not in mods or not value.startswith(tuple(l + "." for l in leaves)):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{line}: names {value!r}")
                elif folder == "reference" and not value.startswith("metacore.reference."):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{line}: names {value!r}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    graph = edges(mods)
    found = cycles(graph)
    lines = []
    for comp in found:
        lines.append("cycle: " + ", ".join(comp))
        for a in comp:
            for b, line in sorted(graph[a].items()):
                if b in comp:
                    lines.append(f"  {os.path.relpath(mods[a][0], ROOT)}:{line} imports {b}")
    assert not found, "\n".join(lines)


def test_the_cycle_finder_finds_cycles():
    """The finder itself, on a made-up graph: a 3-circle, a 2-circle and a chain."""
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"e": 1}, "e": {"d": 1},
             "f": {"a": 1}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_edges_count_function_local_imports():
    mods = modules()
    graph = edges(mods)
    # cli.py imports these only inside functions
    assert "metacore.training" in graph["metacore.cli"]
    assert "metacore.check" in graph["metacore.cli"]


def test_importing_metacore_runs_nothing_of_the_project():
    path = os.path.join(ROOT, "metacore", "__init__.py")
    tree = ast.parse(open(path).read(), path)
    bad = []
    for line, target, level, _ in imports_of("metacore", path, True):
        if level or target.split(".")[0] not in STDLIB:
            bad.append(f"line {line}: imports {target}")
        if target.split(".")[0] == "importlib":
            bad.append(f"line {line}: imports {target} (loads modules by hand)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("modules", "exec_module",
                                                             "module_from_spec",
                                                             "spec_from_file_location"):
            bad.append(f"line {node.lineno}: uses .{node.attr}")
    assert not bad, "metacore/__init__.py:\n" + "\n".join(bad)


def test_a_checkout_imports_kernels_and_reference_under_their_installed_names():
    """Without site-packages (no install, no editable finder), from the checkout root:
    metacore.kernels and metacore.reference are the folders kernels/ and reference/."""
    code = ("import metacore.kernels, metacore.reference\n"
            "print(metacore.kernels.__file__); print(metacore.reference.__file__)\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=""))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [os.path.join(ROOT, "kernels", "__init__.py"),
                                os.path.join(ROOT, "reference", "__init__.py")]
