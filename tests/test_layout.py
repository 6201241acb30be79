"""The package's shape: no import cycle, the core imports no family, small modules, one entry table.

The import graph is read from the source with `ast` (standard library only): every `import` and
`from ... import` inside `sfd_fast/`, at module level or inside functions (a lazy import is still a
dependency), resolved to the `sfd_fast` module it names.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sfd_fast"
CORE = ("schedules", "losses", "denoisers", "generator", "step", "conditions", "config", "checkpoint")
FAMILIES = ("digits", "sd", "ddpm")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, modules: dict) -> str | None:
    """The longest known sfd_fast module that `name` (a dotted path) starts with."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[:len(base) - (node.level - 1)]
                    prefix = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            for t in targets:
                dep = _resolve(t, modules) if t.startswith("sfd_fast") else None
                if dep and dep != mod and not mod.startswith(dep + ".") and dep != "sfd_fast":
                    graph[mod].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_relative_and_lazy_imports():
    g = import_graph()
    assert "sfd_fast.conditions" in g["sfd_fast.step"]           # `from .conditions import ...`
    assert "sfd_fast.engine.deepspeed" in g["sfd_fast.engine"]    # a lazy import inside make_backend


def test_no_import_cycle_in_sfd_fast():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_imports_no_family_and_no_engine():
    g = import_graph()
    for core in CORE:
        deps = g[f"sfd_fast.{core}"]
        bad = {d for d in deps if d.split(".")[1] in FAMILIES + ("engine", "trainer", "train", "cli")}
        assert not bad, f"core module sfd_fast.{core} imports {bad}"


def test_families_do_not_import_each_other():
    g = import_graph()
    for fam in FAMILIES:
        for mod, deps in g.items():
            if mod.startswith(f"sfd_fast.{fam}."):
                other = {d for d in deps if d.split(".")[1] in FAMILIES and d.split(".")[1] != fam}
                assert not other, f"{mod} imports another family: {other}"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in list(PKG.rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_every_family_and_command_entry_resolves():
    from sfd_fast.cli import COMMANDS
    from sfd_fast.families import FAMILIES as TABLE, resolve
    for fam in TABLE.values():
        for ref in (fam.build, fam.checks, fam.evaluate, fam.sample, fam.export):
            if ref:
                assert callable(resolve(ref)), ref
    for ref, _ in COMMANDS.values():
        assert callable(resolve(ref)), ref
