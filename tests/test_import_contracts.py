"""Import-graph contracts (layering walls) checked statically with ``ast``: no module is imported or run.

Each checker takes a package directory (``.../alia_nemo``) and returns one message per violation, naming the
offending file, line and imported name, so the same code runs on the real package and on a deliberately broken
fake package (``test_checkers_report_violations_in_a_fake_package``) that proves the walls can fail.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "alia_nemo"

PLUGIN_LAYERS = ("model", "data", "nemo_rl", "config")  # must stay importable without engines/launch/cli
FORBIDDEN_FOR_PLUGINS = ("engines", "launch", "cli")
NEMO_RL_IMPORTERS = ("engines.nemo_rl", "nemo_rl")  # relative to the package; "nemo_rl" covers the subpackage
PLANNER = "config.planner"
PLANNER_INTERNAL_ALLOWED = ("model.architectures",)
ARGV_READER = "cli"
ARGPARSE_READERS = ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")
EXPORT = "model.export"


# --------------------------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class ImportRef:
    """One import in one module: ``name`` is the absolute module it loads."""

    module: str  # importer, dotted
    path: Path  # importer's file
    lineno: int
    name: str  # absolute imported module (for ``from m import x``: ``m.x`` when that is a module of ours, else ``m``)
    toplevel: bool  # runs when the importer is imported (not inside a function body)
    type_checking: bool  # inside ``if TYPE_CHECKING:``
    dynamic: bool = False  # ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name

    def where(self, root: Path) -> str:
        return f"{_rel(self.path, root)}:{self.lineno}"


@dataclass
class Package:
    root: Path  # the package directory
    name: str
    files: dict[str, Path]  # module name -> file
    trees: dict[str, ast.Module]
    imports: dict[str, list[ImportRef]]

    def within(self, *relative: str) -> list[str]:
        """Our modules equal to, or below, any of the package-relative dotted names."""
        prefixes = [f"{self.name}.{r}" for r in relative]
        return sorted(m for m in self.files if any(_is_or_under(m, p) for p in prefixes))


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root.parent))
    except ValueError:
        return str(path)


def _is_or_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute base module of a ``from ... import`` (relative levels resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]  # a plain module's level-1 base is its parent package
    if node.level - 1 > 0:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _dynamic_import_name(call: ast.Call) -> str | None:
    """The literal module name of ``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")``."""
    func = call.func
    fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if fname not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return arg.value
    return None


def _collect(module: str, path: Path, tree: ast.Module, known: set[str]) -> list[ImportRef]:
    is_package = path.name == "__init__.py"
    refs: list[ImportRef] = []

    def add(lineno: int, name: str, toplevel: bool, type_checking: bool, dynamic: bool = False) -> None:
        refs.append(ImportRef(module, path, lineno, name, toplevel, type_checking, dynamic))

    def visit(node: ast.AST, toplevel: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(getattr(alias, "lineno", node.lineno), alias.name, toplevel, type_checking)
            return
        if isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(getattr(alias, "lineno", node.lineno), sub if sub in known else base, toplevel, type_checking)
            return
        if isinstance(node, ast.Call) and (name := _dynamic_import_name(node)) is not None:
            add(node.lineno, name, toplevel, type_checking, dynamic=True)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # decorators, defaults and annotations run at definition time; only the body is deferred
            for child in [*node.decorator_list, node.args, *([node.returns] if node.returns else [])]:
                visit(child, toplevel, type_checking)
            for child in node.body:
                visit(child, False, type_checking)
            return
        if isinstance(node, ast.Lambda):
            visit(node.args, toplevel, type_checking)
            visit(node.body, False, type_checking)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, toplevel, True)
            for child in node.orelse:
                visit(child, toplevel, type_checking)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, toplevel, type_checking)

    for stmt in tree.body:
        visit(stmt, True, False)
    return refs


def load_package(root: Path) -> Package:
    """Parse every module under ``root`` (a package directory) and collect its imports."""
    return _load_package(Path(root).resolve())


@functools.cache
def _load_package(root: Path) -> Package:
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    trees = {m: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for m, p in files.items()}
    known = set(files)
    imports = {m: _collect(m, files[m], trees[m], known) for m in files}
    return Package(root, root.name, files, trees, imports)


def _loaded_by(name: str, known: set[str]) -> list[str]:
    """Our modules that importing ``name`` runs: the module itself and every parent package."""
    parts = name.split(".")
    return [m for i in range(1, len(parts) + 1) if (m := ".".join(parts[:i])) in known]


def _internal_edges(pkg: Package, module: str) -> list[tuple[str, str]]:
    """(target, how) for each of our modules that ``module`` runs: its own parent package, then its imports."""
    known = set(pkg.files)
    edges: list[tuple[str, str]] = []
    parent = module.rpartition(".")[0]
    if parent in known:
        edges.append((parent, f"{_rel(pkg.files[module], pkg.root)} (parent package {parent})"))
    for ref in pkg.imports[module]:
        for target in _loaded_by(ref.name, known):
            edges.append((target, f"{ref.where(pkg.root)} imports {ref.name}"))
    return edges


# --------------------------------------------------------------------------------------------- the checkers


def check_plugins_import_no_engine_launcher_or_cli(root: Path) -> list[str]:
    """Contract 1: plugin layers never reach engines/launch/cli, directly or through other modules of ours."""
    pkg = load_package(root)
    forbidden = [f"{pkg.name}.{f}" for f in FORBIDDEN_FOR_PLUGINS]

    def is_forbidden(m: str) -> bool:
        return any(_is_or_under(m, f) for f in forbidden)

    violations: list[str] = []
    for start in pkg.within(*PLUGIN_LAYERS):
        # breadth-first from ``start``: shortest chain of imports to each reachable module of ours
        how: dict[str, tuple[str, str]] = {}  # reached module -> (from module, edge description)
        queue = deque([start])
        seen = {start}
        while queue:
            current = queue.popleft()
            for target, edge in _internal_edges(pkg, current):
                if target not in seen:
                    seen.add(target)
                    how[target] = (current, edge)
                    queue.append(target)
        # one report per offending import line of ``start``: its shortest chain, naming the deepest module reached
        by_first_edge: dict[str, tuple[int, int, str, list[str]]] = {}
        for bad in (m for m in seen if is_forbidden(m)):
            chain, node = [], bad
            while node != start:
                node, edge = how[node]
                chain.append(edge)
            chain.reverse()
            candidate = (len(chain), -len(bad), bad, chain)
            by_first_edge[chain[0]] = min(by_first_edge.get(chain[0], candidate), candidate)
        for _, _, bad, chain in sorted(by_first_edge.values(), key=lambda c: c[3][0]):
            kind = "imports" if len(chain) == 1 else "transitively imports"
            violations.append(f"{start} {kind} {bad}: " + " -> ".join(chain))
    return violations


def check_nemo_rl_imported_lazily_by_allowed_modules_only(root: Path) -> list[str]:
    """Contract 2: only engines/nemo_rl.py and the plugin subpackage import ``nemo_rl``, and only in functions."""
    pkg = load_package(root)
    allowed = [f"{pkg.name}.{a}" for a in NEMO_RL_IMPORTERS]
    violations: list[str] = []
    for module in sorted(pkg.imports):
        for ref in pkg.imports[module]:
            if not _is_or_under(ref.name, "nemo_rl"):
                continue
            if not any(_is_or_under(module, a) for a in allowed):
                violations.append(f"{ref.where(root)} ({module}) imports {ref.name}: only {allowed} may")
            elif ref.toplevel and not ref.type_checking:
                violations.append(
                    f"{ref.where(root)} ({module}) imports {ref.name} at module level: import it inside a function"
                )
    return violations


def check_planner_imports(root: Path) -> list[str]:
    """Contract 3: the planner imports the standard library and ``<pkg>.model.architectures`` only."""
    pkg = load_package(root)
    planner = f"{pkg.name}.{PLANNER}"
    allowed = {f"{pkg.name}.{a}" for a in PLANNER_INTERNAL_ALLOWED}
    violations: list[str] = []
    for ref in pkg.imports.get(planner, []):
        top = ref.name.split(".")[0]
        if top == pkg.name:
            if ref.name not in allowed:
                violations.append(f"{ref.where(root)} ({planner}) imports {ref.name}: only {sorted(allowed)}")
        elif top not in sys.stdlib_module_names:
            violations.append(f"{ref.where(root)} ({planner}) imports third-party {ref.name}")
    return violations


def check_only_cli_reads_argv(root: Path) -> list[str]:
    """Contract 4: no module but cli.py touches ``sys.argv`` or lets argparse read it implicitly."""
    pkg = load_package(root)
    cli = f"{pkg.name}.{ARGV_READER}"
    violations: list[str] = []
    for module, tree in sorted(pkg.trees.items()):
        if module == cli:
            continue
        where = _rel(pkg.files[module], root)
        sys_aliases = {"sys"} | {
            a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name == "sys"
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "sys":
                if any(a.name in ("argv", "*") for a in node.names):
                    violations.append(f"{where}:{node.lineno} ({module}) imports argv from sys")
            elif isinstance(node, ast.Attribute) and node.attr == "argv":
                value = node.value
                if (isinstance(value, ast.Name) and value.id in sys_aliases) or (
                    isinstance(value, ast.Attribute) and value.attr == "sys"
                ):
                    use = "writes" if isinstance(node.ctx, (ast.Store, ast.Del)) else "reads"
                    violations.append(f"{where}:{node.lineno} ({module}) {use} sys.argv")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ARGPARSE_READERS
            ):
                explicit = [*node.args, *(k.value for k in node.keywords if k.arg == "args")]
                reads_argv = not explicit or (isinstance(explicit[0], ast.Constant) and explicit[0].value is None)
                if reads_argv:
                    violations.append(
                        f"{where}:{node.lineno} ({module}) calls {node.func.attr}() without arguments (reads sys.argv)"
                    )
    return violations


def check_export_does_not_import_nemo_rl(root: Path) -> list[str]:
    """Contract 5: ``<pkg>.model.export`` never imports ``nemo_rl``, lazily or not."""
    pkg = load_package(root)
    export = f"{pkg.name}.{EXPORT}"
    return [
        f"{ref.where(root)} ({export}) imports {ref.name}"
        for ref in pkg.imports.get(export, [])
        if _is_or_under(ref.name, "nemo_rl")
    ]


def _fail_on(violations: list[str], wall: str) -> None:
    if violations:
        pytest.fail(f"{wall} — {len(violations)} violation(s):\n  " + "\n  ".join(violations), pytrace=False)


# --------------------------------------------------------------------------------------------- the real package


def test_plugins_import_no_engine_launcher_or_cli():
    """Plugins (model, data, nemo_rl, config) load inside NeMo-RL workers, which must not drag in engines or CLI."""
    _fail_on(check_plugins_import_no_engine_launcher_or_cli(PACKAGE_DIR), "plugins reach engines/launch/cli")


def test_nemo_rl_is_imported_lazily_and_only_by_its_engine_and_plugins():
    """NeMo-RL exists only in its container, so everything else must import, and these must import, without it."""
    _fail_on(check_nemo_rl_imported_lazily_by_allowed_modules_only(PACKAGE_DIR), "nemo_rl imports")


def test_planner_imports_stdlib_and_architectures_only():
    """The planner runs on login nodes and in quick CLI calls, so it stays stdlib plus the architecture table."""
    _fail_on(check_planner_imports(PACKAGE_DIR), "planner imports")


def test_only_cli_reads_argv():
    """Library code must take its arguments as parameters; only the CLI entry point may consult the process argv."""
    _fail_on(check_only_cli_reads_argv(PACKAGE_DIR), "sys.argv outside cli.py")


def test_export_does_not_import_nemo_rl():
    """Export converts checkpoints outside the NeMo-RL container, so it must never need NeMo-RL."""
    _fail_on(check_export_does_not_import_nemo_rl(PACKAGE_DIR), "model.export imports nemo_rl")


# --------------------------------------------------------------------------------------------- the checkers can fail


FAKE = {
    "__init__.py": "",
    "cli.py": "import sys\nARGS = sys.argv[1:]\n",
    "errors.py": "",
    "model/__init__.py": "",
    "model/architectures.py": "import math\n",
    # 5 and 2: export imports nemo_rl lazily (allowed nowhere outside engines/nemo_rl.py and the plugins)
    "model/export.py": "def export():\n    import nemo_rl.models\n",
    "model/tokenizer.py": "from ..engines import local\n",  # 1: direct, relative
    "data/__init__.py": "",
    "data/cache.py": "def f():\n    from alia_nemo.data import helper\n",  # 1: transitive through data.helper
    "data/helper.py": "def g():\n    import alia_nemo.launch.submit\n",
    "data/ok.py": (
        "from typing import TYPE_CHECKING\nfrom . import cache\nfrom alia_nemo.nemo_rl import dataset\n"
        "if TYPE_CHECKING:\n    import nemo_rl\n"  # 2: allowed module? no — data may not import nemo_rl at all
    ),
    "config/__init__.py": "",
    "config/schema.py": "from alia_nemo import cli\n",  # 1: ``from pkg import submodule``
    # 3: an internal module beyond architectures, and a third-party one
    "config/planner.py": (
        "from __future__ import annotations\nimport math\nfrom ..model.architectures import X\n"
        "from alia_nemo.model import architectures\nfrom alia_nemo.data import cache\nimport numpy as np\n"
    ),
    "engines/__init__.py": "",
    "engines/local.py": "import argparse\nargs = argparse.ArgumentParser().parse_args()\n",  # 4
    # 2: module-level import in an allowed module; the TYPE_CHECKING and in-function ones are fine
    "engines/nemo_rl.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nemo_rl.algorithms import sft\n"
        "import nemo_rl\n\ndef run():\n    from nemo_rl.algorithms.sft import setup\n"
    ),
    "launch/__init__.py": "",
    "launch/submit.py": "from sys import argv\n",  # 4
    "launch/job_entry.py": "import sys as _s\n\ndef main(p):\n    _s.argv = ['x']\n    p.parse_known_args(None)\n",  # 4
    "nemo_rl/__init__.py": "from alia_nemo.nemo_rl.dataset import D\n",  # our subpackage, not third-party nemo_rl
    "nemo_rl/dataset.py": (
        "from . import processor\n\nclass D:\n    def load(self):\n        from nemo_rl.data import interfaces\n"
    ),
    "nemo_rl/processor.py": "import importlib\nMOD = importlib.import_module('nemo_rl.data.processors')\n",  # 2
    "eval/__init__.py": "",
    "eval/harness.py": "import argparse\n\ndef main(argv):\n    return argparse.ArgumentParser().parse_args(argv)\n",
}


@pytest.fixture
def fake_package(tmp_path) -> Path:
    root = tmp_path / "alia_nemo"
    for rel, text in FAKE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_checkers_report_violations_in_a_fake_package(fake_package):
    """A checker that cannot fail proves nothing: each wall must catch a deliberate breach, and nothing else."""
    plugins = check_plugins_import_no_engine_launcher_or_cli(fake_package)
    assert any(
        v.startswith("alia_nemo.model.tokenizer imports alia_nemo.engines")
        and "alia_nemo/model/tokenizer.py:1 imports alia_nemo.engines.local" in v
        for v in plugins
    ), plugins
    assert any(
        v.startswith("alia_nemo.data.cache transitively imports alia_nemo.launch")
        and "alia_nemo/data/cache.py:2 imports alia_nemo.data.helper -> alia_nemo/data/helper.py:2" in v
        for v in plugins
    ), plugins
    assert any(v.startswith("alia_nemo.config.schema imports alia_nemo.cli") and ".py:1" in v for v in plugins)
    assert any(v.startswith("alia_nemo.data.ok transitively imports alia_nemo.launch") for v in plugins), plugins
    assert not any(v.startswith(("alia_nemo.model.architectures ", "alia_nemo.nemo_rl")) for v in plugins), plugins

    nemo_rl = check_nemo_rl_imported_lazily_by_allowed_modules_only(fake_package)
    assert sorted(v.split(" ")[0] for v in nemo_rl) == [
        "alia_nemo/data/ok.py:5",
        "alia_nemo/engines/nemo_rl.py:4",
        "alia_nemo/model/export.py:2",
        "alia_nemo/nemo_rl/processor.py:2",
    ], nemo_rl
    assert any("engines/nemo_rl.py:4" in v and "imports nemo_rl at module level" in v for v in nemo_rl)
    assert any("model/export.py:2" in v and "imports nemo_rl.models" in v for v in nemo_rl)

    planner = check_planner_imports(fake_package)
    assert sorted(planner) == [
        "alia_nemo/config/planner.py:5 (alia_nemo.config.planner) imports alia_nemo.data.cache: "
        "only ['alia_nemo.model.architectures']",
        "alia_nemo/config/planner.py:6 (alia_nemo.config.planner) imports third-party numpy",
    ], planner

    argv = check_only_cli_reads_argv(fake_package)
    assert sorted(argv) == [
        "alia_nemo/engines/local.py:2 (alia_nemo.engines.local) calls parse_args() without arguments (reads sys.argv)",
        "alia_nemo/launch/job_entry.py:4 (alia_nemo.launch.job_entry) writes sys.argv",
        "alia_nemo/launch/job_entry.py:5 (alia_nemo.launch.job_entry) calls parse_known_args() without arguments "
        "(reads sys.argv)",
        "alia_nemo/launch/submit.py:1 (alia_nemo.launch.submit) imports argv from sys",
    ], argv

    assert check_export_does_not_import_nemo_rl(fake_package) == [
        "alia_nemo/model/export.py:2 (alia_nemo.model.export) imports nemo_rl.models"
    ]
