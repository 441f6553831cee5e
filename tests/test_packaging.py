"""What `pip install localmoe` promises: every module the package and the README's examples import comes with it,
and every dependency names the major versions it is known to work with. CI installs the newest versions the
bounds allow and runs the suite on them, so the bounds stated are the ones proven."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = [Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra]
# modules of an extra, imported only where its feature is asked for: the GPU path's Triton where it is installed
# (layers/triton_kernels.py), Ray by --distributed-executor-backend ray (engine/model_runner.py)
EXTRA_ONLY = {"triton": "gpu", "ray": "ray"}


def distributions(modules: set[str]) -> dict[str, set[str]]:
    """Top-level module -> the installed distributions providing it (canonical names); stdlib and localmoe left out."""
    providers = importlib.metadata.packages_distributions()
    return {m: {canonicalize_name(d) for d in providers.get(m, [])} for m in modules
            if m not in sys.stdlib_module_names and m != "localmoe"}


def imported(source: str) -> set[str]:
    """Top-level names of every absolute import in `source`, function-level ones included, except optional ones
    (inside a `try` that catches ImportError: an extra's)."""
    tree = ast.parse(source)
    optional = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try)
                and any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers)
                for statement in node.body for inner in ast.walk(statement)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_dependency_has_an_upper_bound_that_the_installed_version_meets() -> None:
    for requirement in RUNTIME + EXTRAS:
        assert any(s.operator in ("<", "<=", "==", "~=") for s in requirement.specifier), requirement
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (str(requirement), installed)


def test_every_module_localmoe_imports_is_a_runtime_dependency() -> None:
    modules = set().union(*(imported(path.read_text()) for path in (REPO / "localmoe").rglob("*.py")))
    runtime = {canonicalize_name(r.name) for r in RUNTIME}
    for module, providers in distributions(modules - set(EXTRA_ONLY)).items():
        assert providers & runtime, f"localmoe imports {module} ({providers or 'not installed'}), not a dependency"
    for module, extra in EXTRA_ONLY.items():
        assert distributions({module})[module] & {canonicalize_name(Requirement(r).name)
                                                  for r in PROJECT["optional-dependencies"][extra]}, (module, extra)


def test_serving_on_cpu_never_imports_an_extra() -> None:
    """The extras' modules are imported where their feature runs (a step on CUDA, a Ray cluster), never by the server
    or an engine on CPU."""
    code = ("import sys; import localmoe.server.app, localmoe.llm, localmoe.engine.model_runner, localmoe.cli; "
            f"print(sorted(m for m in {sorted(EXTRA_ONLY)} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_readme_examples_need_nothing_beyond_pip_install_localmoe() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    assert any("from openai import OpenAI" in block for block in blocks)
    runtime = {canonicalize_name(r.name) for r in RUNTIME}
    for module, providers in distributions(set().union(*map(imported, blocks))).items():
        assert providers & runtime, f"the README imports {module}, which `pip install localmoe` does not bring"
