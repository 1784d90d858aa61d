"""setup.py next to the Hugging Face `kernels` package, which transformers installs.

setup.py reads tools/kernels.py (the one list of compiled kernels). Imported as plain `kernels` it shadowed that
package: setuptools then resolved the package's egg_info entry point (`kernels._internals.locking`) against the
file, and `pip install --no-build-isolation .` failed with "'kernels' is not a package" (the CI of session 16,
once transformers brought kernels 0.19). The test runs a copy of setup.py (so the checkout's build record is not
rewritten) beside a stand-in `kernels` package and asserts that the package stays importable after it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_py_does_not_shadow_a_kernels_package(tmp_path):
    tree = tmp_path / "tree"
    (tree / "tools").mkdir(parents=True)
    (tree / "flash_attn3").mkdir()
    (tree / "flash_attn3" / "__init__.py").write_text("")
    shutil.copy(ROOT / "setup.py", tree / "setup.py")
    shutil.copy(ROOT / "tools" / "kernels.py", tree / "tools" / "kernels.py")
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "_internals.py").write_text("MARK = 'the stand-in package'\n")
    script = (
        "import runpy, sys\n"
        "sys.argv = ['setup.py', '--name']\n"
        "runpy.run_path('setup.py', run_name='__main__')\n"
        "import kernels._internals\n"
        "print(kernels._internals.MARK)\n"
    )
    env = dict(os.environ, FLASH_ATTN3_SKIP_CUDA_BUILD="1", PYTHONPATH=str(tmp_path / "site"))
    run = subprocess.run([sys.executable, "-c", script], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "the stand-in package" in run.stdout
    # setup.py still read the kernel table: the pure-Python install writes its build record from it.
    assert "built" in (tree / "flash_attn3" / "_build_config.py").read_text().lower()
