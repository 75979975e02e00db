"""The import layering: the shared packages (common/, models/) import no script and nothing of data_preprocessing/,
so that the arrows point from the steps down to the shared code and never back up."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("common", "models")
SCRIPTS = tuple(sorted(p.stem for p in ROOT.glob("*.py")))  # the pipeline's steps at the repository root
UPPER = ("data_preprocessing", "bench", "tests", *SCRIPTS)  # what a shared module must not import


def imported_modules(source: str, package: str) -> set[str]:
    """Every module name an import statement of `source` names (also inside functions), relative ones resolved
    against `package`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def upward_imports(source: str, package: str) -> list[str]:
    return sorted(n for n in imported_modules(source, package) if n.split(".")[0] in UPPER)


def test_the_shared_packages_import_no_script_and_nothing_of_data_preprocessing() -> None:
    files = [p for name in SHARED for p in sorted((ROOT / name).glob("*.py"))]
    assert len(files) > 10 and "sample_var" in SCRIPTS and "train_vqvae" in SCRIPTS  # the check sees the code
    found = {str(p.relative_to(ROOT)): upward_imports(p.read_text(), p.parent.name) for p in files}
    assert {path: names for path, names in found.items() if names} == {}


def test_the_layering_check_finds_every_form_of_an_upward_import() -> None:
    assert upward_imports("from data_preprocessing.scan_area import detect_scan_area\n", "common") \
        == ["data_preprocessing.scan_area", "data_preprocessing.scan_area.detect_scan_area"]
    assert upward_imports("def f():\n    import sample_var\n", "models") == ["sample_var"]
    assert upward_imports("from eval_var import load_sweep as ls\n", "common") == ["eval_var", "eval_var.load_sweep"]
    assert upward_imports("from ..data_preprocessing import readers\n", "common") \
        == ["data_preprocessing", "data_preprocessing.readers"]
    assert upward_imports("from common.io import read_json\nimport torch\nfrom . import var\n", "models") == []
