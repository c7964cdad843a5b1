"""Imports point down the reading order: td_ln.py imports nothing of the project, each of the six
paper files imports only those before it (td_ln, dimr, diffusion, sample, fid, train) and support/,
support/ imports none of sample, fid or train, and no two modules import each other, directly or
through others. Read from the source with ast (every import statement, also inside functions)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READING_ORDER = ("td_ln", "dimr", "diffusion", "sample", "fid", "train")


def project_imports():
    """{module: set of project modules it imports} for the six files, support/ and tools/."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("support/*.py"), *ROOT.glob("tools/*.py")]
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in files}
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {f"{node.module}.{a.name}" for a in node.names} & set(names)
                if node.module in names and node.module not in ("support", "tools"):
                    found.add(node.module)
        graph[name] = found - {name}
    return graph


def test_the_six_files_import_down_the_reading_order():
    graph = project_imports()
    assert graph["td_ln"] == set()
    for i, name in enumerate(READING_ORDER):
        later = set(READING_ORDER[i:])
        assert not graph[name] & later, (name, graph[name] & later)
        assert all(m in READING_ORDER or m.startswith("support") for m in graph[name]), name
    for name, imported in graph.items():
        if name.startswith("support"):
            assert not imported & {"sample", "fid", "train"}, (name, imported)


def test_no_import_cycles():
    graph = project_imports()

    def reachable(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        return seen

    assert [m for m in graph if m in reachable(m)] == []
