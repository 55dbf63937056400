"""The engine works without a display: nothing in it may import Qt or the studio; and its modules form layers,
with no import cycle between them."""

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"
FORBIDDEN = ("PySide6", "pyqtgraph", "studio", "shiboken6")


def test_no_engine_file_imports_qt_or_studio():
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_imports() -> dict[str, set[str]]:
    """Module -> the engine modules it imports, at the top or inside a function (a lazy import that closes a
    cycle is still a cycle: it only hides it until that function runs)."""
    modules = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # ``from engine.cli import build`` imports the submodule engine.cli.build
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_engine_import_graph_has_no_cycles():
    graph = engine_imports()
    assert "engine.directions" in graph["engine.steering"] and "engine.models" in graph["engine.mixer"]  # it sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_direction_kinds_know_nothing_of_each_other_and_the_protocol_is_a_leaf():
    graph = engine_imports()
    assert "engine.weight_delta" not in graph["engine.steering"] and "engine.steering" not in graph["engine.weight_delta"]
    assert graph["engine.directions"] <= {"engine.errors", "engine.paths"}
    for user in ("engine.mixer", "engine.export", "engine.export.hf", "engine.export.peft", "engine.export.controlvector"):
        assert not graph[user] & {"engine.steering", "engine.weight_delta"}, user  # they use the protocol only


def test_importing_the_whole_engine_loads_no_qt():
    modules = sorted(_module_name(p) for p in ENGINE.rglob("*.py") if p.name != "__main__.py")
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_session_controller_and_the_worker_messages_need_no_qt():
    studio = ENGINE.parent / "studio"
    code = ("import sys, importlib\n"
            "for m in ('studio.session', 'studio.messages'): importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[:2] + FORBIDDEN[3:]!r}]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    assert (studio / "session.py").is_file() and (studio / "messages.py").is_file()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
