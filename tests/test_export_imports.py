"""The export stage's import boundaries: the loading side (export.runtime and what it imports) never imports the
writing side (onnx_export, tensorrt, parity, cli), and importing it costs neither torch nor any other stage."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME_SIDE = ("export/__init__.py", "export/runtime.py", "export/backends.py", "export/metadata.py",
                "export/preprocess.py", "export/errors.py")  # fmt: skip
WRITING_SIDE = {"export.onnx_export", "export.tensorrt", "export.parity", "export.cli"}


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement names anywhere in the file, lazy imports inside functions included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_runtime_side_never_imports_the_writing_side():
    for rel in RUNTIME_SIDE:
        imported = _imported_modules(REPO / rel)
        assert not imported & WRITING_SIDE, f"{rel} imports {sorted(imported & WRITING_SIDE)}"
        # torch only inside the TensorRT backend (CUDA buffers), never at import: see the subprocess test below
        assert not any(name.split(".")[0] in ("pretrain", "models", "data") for name in imported), rel
    # the writing side does import the runtime (it runs the exported file for parity): the check above is not vacuous
    assert "export.runtime" in _imported_modules(REPO / "export/onnx_export.py")


def test_importing_export_and_its_runtime_loads_no_other_stage_nor_torch():
    code = "import sys, export, export.runtime\nprint(sorted({m.split('.')[0] for m in sys.modules}))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(eval(proc.stdout))  # noqa: S307 - our own subprocess printing a list of names
    assert "export" in loaded
    product = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert loaded & product == {"core", "export"}, loaded & product
    assert not loaded & {"torch", "torchvision", "onnx", "onnxruntime", "pydantic"}, loaded
