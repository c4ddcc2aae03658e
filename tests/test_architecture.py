"""The package's shape: layers that point one way, no import cycles, front ends imported by nothing.

Walks the source with the standard library's `ast` (every import, including those inside functions, since
a function-local import can hide a cycle as well as a top-level one).
"""

import ast
import subprocess
import sys
from pathlib import Path

import lynx

ROOT = Path(lynx.__file__).parent
# Lower layers never import higher ones; modules of one layer may import each other (without cycles).
LAYERS = {
    "lynx.constants": 0, "lynx.errors": 0,
    "lynx.runtime": 1, "lynx.models": 1, "lynx.face": 1, "lynx.io": 1,
    "lynx.pipelines": 2, "lynx.training": 2, "lynx.evaluation": 2, "lynx.testing": 2,
    "lynx.apps": 3, "lynx.__main__": 3,
}


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    graph = {}
    for name, (path, package) in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = name.split(".") if package else name.split(".")[:-1]
                if node.level:
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def layer(module: str) -> int:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert matches, f"{module} belongs to no layer: add its package to LAYERS"
    return LAYERS[max(matches, key=len)]


def test_imports_point_down_the_layers():
    wrong = [f"{a} -> {b}" for a, deps in import_graph().items() if a != "lynx" for b in deps
             if b != "lynx" and layer(b) > layer(a)]
    assert not wrong, "imports that point up the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = import_graph()
    # Tarjan's strongly connected components; a component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walk_sees_hidden_and_relative_imports(tmp_path):
    """An upward import inside a function, in a copy of the layout, is found."""
    pkg = tmp_path / "lynx"
    for sub in ("models", "apps"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "apps" / "cli.py").write_text("from ..models import probe\n")
    (pkg / "models" / "probe.py").write_text("def f():\n    from ..apps import cli\n")
    graph = import_graph(pkg)
    assert graph["lynx.models.probe"] == {"lynx.apps.cli"} and graph["lynx.apps.cli"] == {"lynx.models.probe"}


def test_library_imports_load_no_front_end():
    code = ("import sys, lynx, lynx.pipelines.pipeline_lynx, lynx.training.trainer, lynx.evaluation.bench, lynx.face; "
            "lynx.LynxPipeline, lynx.FaceAnalyzer, lynx.parallelize; "
            "print(sorted(m for m in sys.modules if m.startswith('lynx.apps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_web_page_does_not_import_the_command_line():
    """The two front ends share model options through lynx.apps.options; neither reaches into the other."""
    graph = import_graph()
    web = {m for m in graph if m.startswith("lynx.apps.web")}
    assert web and not {dep for m in web for dep in graph[m] if dep.startswith("lynx.apps.cli")}
    code = "import sys, lynx.apps.web.app, lynx.apps.web.study; print('lynx.apps.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_command_refuses_a_mistyped_setting_without_importing_torch(tmp_path):
    """`import lynx` is light (its heavy names are imported on first use) and `lynx generate` checks its settings
    before it needs torch or diffusers, so such a mistake is answered at once; the public names still resolve."""
    code = ("import sys, lynx, lynx.apps.cli as cli; "
            "code = cli.main(['generate', '--embedding', 'e.npy', '--prompt', 'a man walks', '--fps', '-5']); "
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'cv2') if m in sys.modules); "
            "print(code, heavy, lynx.LynxPipeline.__name__, lynx.GenerationSettings.__name__, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.split() == ["2", "[]", "LynxPipeline", "GenerationSettings", "True"], r.stdout + r.stderr
    assert r.stderr.strip() == "lynx generate: error: --fps -5 must be between 1 and 240 (try 1)"
    assert set(lynx.__all__) <= set(dir(lynx)) and all(getattr(lynx, name) for name in lynx.__all__)
