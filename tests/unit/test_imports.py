"""``import hpattn_dist`` stays lean; every module of the package imports."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import hpattn_dist

# Tools, optional dependencies and plotting must not ride along with the library import; nor
# torch._dynamo (seconds per process, and Note [clean exit]: hpattn_dist.tracing).
_HEAVY = ("hpattn_dist.tools", "hpattn_dist.io", "matplotlib", "deepspeed", "idx_flow", "healpy", "sklearn",
          "zarr", "xarray", "torch._dynamo")


def test_import_hpattn_dist_is_lean():
    code = ("import sys, hpattn_dist; print('\\n'.join(m for m in sys.modules if m.split('.')[0] in "
            f"{tuple(h.split('.')[0] for h in _HEAVY)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = out.stdout.split()
    assert "hpattn_dist" in loaded  # the probe sees the package itself
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in _HEAVY)]
    assert heavy == [], f"import hpattn_dist pulled in {heavy}"


def test_tools_platform_imports_no_torch():
    # hpattn_dist/__init__ imports torch, so load the module by path to see its own imports.
    path = hpattn_dist.__path__[0] + "/tools/platform.py"
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('p', %r); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print('torch' in sys.modules, m.pin_math_library({}))" % path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split()[0] == "False"


_OPTIONAL = {"hpattn_dist.integrations.deepspeed": "deepspeed", "hpattn_dist.integrations.idx_flow": "idx_flow",
             "hpattn_dist.io": "zarr"}


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.walk_packages(hpattn_dist.__path__, "hpattn_dist.")))
def test_every_module_imports(name):
    needs = next((dep for prefix, dep in _OPTIONAL.items() if name.startswith(prefix)), None)
    if needs is not None:
        pytest.importorskip(needs)
    importlib.import_module(name)
