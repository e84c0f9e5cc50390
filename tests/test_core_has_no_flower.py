"""carefl/ is the domain core: importing all of it must not import Flower."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import carefl


def test_importing_every_core_module_does_not_import_flwr():
    modules = [m.name for m in pkgutil.walk_packages(carefl.__path__, "carefl.")]
    assert "carefl.federation" in modules and "carefl.robust.krum" in modules
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint(sorted(k for k in sys.modules if k.split('.')[0] == 'flwr'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(carefl.__file__).parents[1])
    assert out.stdout.strip() == "[]"
