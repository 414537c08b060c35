"""The house rule of docs/ARCHITECTURE.md ("Layers"), enforced: imports run down the floors, never up, never round.

Every module of src/sib is parsed with `ast` (nothing is imported, so the test also sees imports made inside
functions, which only run later), each import of a sib module becomes an edge from the importing module's
room to the imported module's room, and each edge must go to a lower floor, or to a room of the same floor
that `PEERS` allows. The room graph must have no circle, and the ARCHITECTURE.md picture must list the same
floors and rooms as `FLOORS`, so that the picture a newcomer reads is the one the test enforces.

A room is a top-level module of sib (`sib/train.py` -> "train"), a top-level package with all its modules
(`sib/report/html.py` -> "report"), or "__init__" for the package's own `__init__.py` (its public API).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"

# Floors from the bottom up: (name, rooms). A room may import rooms on lower floors, and rooms of its own floor
# only where PEERS says so. Keep docs/ARCHITECTURE.md's picture (between the `layers:` markers) the same.
FLOORS: list[tuple[str, list[str]]] = [
    ("tools", ["io", "registry", "batching", "distributed", "schedule", "fast_bn", "claim", "progress", "study_pool"]),
    ("records", ["tables", "task_record", "run_dir"]),
    ("inputs", ["data", "models"]),
    ("explanations", ["explain"]),
    ("measures", ["metrics", "loss", "guidance"]),
    ("library", ["regularizers", "eval_summary", "__init__"]),
    ("config", ["config"]),
    ("parts", ["runtime", "step", "epoch", "diagnostics"]),
    ("commands", ["train", "evaluate", "explain_files", "report"]),
    ("launchers", ["launch"]),
    ("workflows", ["demo", "study"]),
    ("entry", ["cli", "__main__"]),
]
# (importer, imported): rooms of one floor that may import each other, one way only.
PEERS: set[tuple[str, str]] = {
    ("epoch", "step"),
    ("diagnostics", "step"),
    ("explain_files", "report"),
    ("run_dir", "task_record"),
    ("__main__", "cli"),
}


@dataclass(frozen=True)
class Import:
    """One import of a sib module: where it is written and what it names."""

    source: str  # the importing module, "sib.report.html"
    target: str  # the imported module, "sib.run_dir" (a submodule when `from pkg import submodule`)
    file: str  # relative to the source root: "sib/report/html.py"
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sib_imports(src: Path = SRC) -> tuple[set[str], list[Import]]:
    """(every module of sib, every import of a sib module in them), imports inside functions included."""
    files = sorted((src / "sib").rglob("*.py"))
    modules = {module_name(f, src) for f in files}
    found = []
    for f in files:
        source = module_name(f, src)
        package = source if f.name == "__init__.py" else source.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from .x import y` inside sib.pkg
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one, else the names of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target == "sib" or target.startswith("sib."):
                    found.append(Import(source, target, f.relative_to(src).as_posix(), node.lineno))
    return modules, found


def room(module: str) -> str:
    """"__init__" for the package's own __init__.py, else the top-level module or package under sib."""
    return "__init__" if module == "sib" else module.split(".")[1]


def floor_of() -> dict[str, int]:
    return {r: i for i, (_, rooms) in enumerate(FLOORS) for r in rooms}


def layer_violations(src: Path = SRC) -> list[str]:
    """Every import that runs up the floors or sideways without a PEERS entry, and every room not on a floor."""
    modules, imports = sib_imports(src)
    floors = floor_of()
    names = [name for name, _ in FLOORS]
    problems = [f"room {r!r} (module {m}) is on no floor of FLOORS" for m in sorted(modules)
                for r in [room(m)] if r not in floors]
    for imp in imports:
        a, b = room(imp.source), room(imp.target)
        if a == b or a not in floors or b not in floors:
            continue
        fa, fb = floors[a], floors[b]
        if fb > fa:
            problems.append(f"{imp.where()}: {imp.source} imports {imp.target}: up from floor {fa} "
                            f"({names[fa]}) to floor {fb} ({names[fb]})")
        elif fb == fa and (a, b) not in PEERS:
            problems.append(f"{imp.where()}: {imp.source} imports {imp.target}: a room of its own floor {fa} "
                            f"({names[fa]}) that PEERS does not allow")
    return problems


def circles(src: Path = SRC) -> list[str]:
    """Circles of the room graph (one per back edge of a depth-first walk: at least one if there is any), each
    as its imports in order, with the file and line of each."""
    _, imports = sib_imports(src)
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        a, b = room(imp.source), room(imp.target)
        if a != b:
            edges.setdefault(a, {}).setdefault(b, imp)
    found, state, stack = [], {}, []  # state: 1 on the current path, 2 finished

    def visit(r: str) -> None:
        state[r] = 1
        stack.append(r)
        for nxt in sorted(edges.get(r, {})):
            if state.get(nxt) == 1:  # back to a room on the path: the path from there is a circle
                loop = stack[stack.index(nxt):] + [nxt]
                found.append(" -> ".join(loop) + ": " + "; ".join(
                    f"{edges[x][y].where()} {edges[x][y].source} imports {edges[x][y].target}"
                    for x, y in zip(loop, loop[1:], strict=False)))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[r] = 2

    for r in sorted(edges):
        if r not in state:
            visit(r)
    return found


def documented_layers(text: str) -> tuple[list[tuple[str, list[str]]], set[tuple[str, str]]]:
    """The picture between `<!-- layers:start` and `<!-- layers:end -->`: floors as lines `N  name  room ...`
    (drawn top floor first; a package's room ends with '/'), and a line `peers: a -> b, c -> d`.
    Returns (floors bottom first, like FLOORS; peers, like PEERS)."""
    block = text.split("<!-- layers:start", 1)[1].split("<!-- layers:end -->", 1)[0]
    rows = [m for m in (re.match(r"\s*(\d+)\s+(\S+)\s+(.*)$", line) for line in block.splitlines()) if m]
    rows.sort(key=lambda m: int(m.group(1)))
    floors = [(m.group(2), [r.rstrip("/") for r in m.group(3).split()]) for m in rows]
    peers = {pair for line in block.splitlines() if line.strip().startswith("peers:")
             for pair in re.findall(r"(\w+) -> (\w+)", line)}
    return floors, peers


def test_imports_run_down_the_floors():
    problems = layer_violations()
    assert not problems, "imports against docs/ARCHITECTURE.md's layers:\n" + "\n".join(problems)


def test_no_import_circle():
    found = circles()
    assert not found, "import circles between rooms:\n" + "\n".join(found)


def test_every_room_on_a_floor_exists():
    modules, _ = sib_imports()
    rooms = {room(m) for m in modules}
    declared = [r for _, rs in FLOORS for r in rs]
    assert len(declared) == len(set(declared)), "a room is on two floors"
    assert set(declared) <= rooms, f"FLOORS names rooms that src/sib does not have: {set(declared) - rooms}"
    assert all(a in declared and b in declared and floor_of()[a] == floor_of()[b] for a, b in PEERS)


def test_architecture_picture_matches_floors():
    floors, peers = documented_layers(ARCHITECTURE.read_text())
    assert floors == FLOORS
    assert peers == PEERS


def test_the_check_finds_an_upward_import_and_a_circle(tmp_path):
    """The checks can fail: a copy of sib where models imports the trainer (up) and data imports models (a
    peer, and with models -> ... -> data a circle) is caught, with the file and line of each."""
    sib = tmp_path / "sib"
    for f in (SRC / "sib").rglob("*.py"):
        (sib / f.relative_to(SRC / "sib")).parent.mkdir(parents=True, exist_ok=True)
        (sib / f.relative_to(SRC / "sib")).write_text(f.read_text())
    models = sib / "models.py"
    models.write_text(models.read_text() + "\n\ndef _up():\n    from sib.train import train  # noqa\n")
    (sib / "data" / "extra.py").write_text("from sib.models import create_model\n")
    problems = layer_violations(tmp_path)
    assert any(p.startswith("sib/models.py:") and "imports sib.train: up from floor 2 (inputs) to floor 8" in p
               for p in problems)
    assert any(p.startswith("sib/data/extra.py:1: sib.data.extra imports sib.models: a room of its own floor")
               for p in problems)
    assert any("sib/models.py" in c and "sib/data/extra.py:1" in c for c in circles(tmp_path))
