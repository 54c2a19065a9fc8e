"""Import, fallback and the `torchfast info` command."""
import json
import os
import subprocess
import sys

import pytest
import torch

import torchfast
from torchfast import _loader

# Subprocesses import the same torchfast as this process (an installed one, or an in-place build),
# and run outside the source tree so that its un-built package cannot shadow it.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(torchfast.__file__)))


def run_python(code=None, args=(), cwd=None, **env):
    full_env = {**os.environ, "PYTHONPATH": PKG_PARENT, **env}
    argv = [sys.executable] + (["-c", code] if code is not None else list(args))
    return subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=300,
                          cwd=cwd or os.path.expanduser("~"))


def test_info_reports_build_and_kernels():
    info = torchfast.info()
    assert info["torch"] == torch.__version__
    assert set(info["kernels"]) == set(_loader.OPS)
    if info["kernels_loaded"]:
        assert info["build"]["torch_version"] == torch.__version__
        assert "cpu" in info["kernels"]["fused_adam_"]


def test_info_command():
    out = run_python(args=["-m", "torchfast", "info", "--json"])
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__ and info["kernels"] == torchfast.info()["kernels"]
    text = run_python(args=["-m", "torchfast", "info"])
    assert text.returncode == 0 and "fused_adam_" in text.stdout and "torch" in text.stdout


def test_disable_kernels_forces_reference_path():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('error')\n"  # the explicit switch warns about nothing
        "import torchfast\n"
        "assert not torchfast.info()['kernels_loaded']\n"
        "assert torchfast.info()['kernels']['fused_adam_'] == []\n"
        "p = [torch.ones(5, requires_grad=True)]; q = [torch.ones(5, requires_grad=True)]\n"
        "o1, o2 = torchfast.optim.Adam(p, lr=0.1), torch.optim.Adam(q, lr=0.1, foreach=False)\n"
        "for i in range(3):\n"
        "    p[0].grad = torch.full((5,), float(i) - 0.5); q[0].grad = p[0].grad.clone(); o1.step(); o2.step()\n"
        "torch.testing.assert_close(p[0], q[0], rtol=1e-6, atol=1e-6)\n"
        "print('ok')\n"
    )
    out = run_python(code, TORCHFAST_DISABLE_KERNELS="1")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_version_mismatch_is_detected():
    reason = _loader._why_not_loadable({"torch_version": "0.0.1", "cuda": False})
    assert "built against torch 0.0.1" in reason and torch.__version__ in reason


def test_missing_library_warns_once_and_falls_back(tmp_path):
    """A copy of the package without its compiled libraries imports, warns once and runs the reference."""
    import shutil

    pkg = tmp_path / "torchfast"
    shutil.copytree(os.path.dirname(torchfast.__file__), pkg,
                    ignore=shutil.ignore_patterns("*.so", "_build_info.json", "__pycache__"))
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torchfast, torchfast.optim\n"
        "msgs = [str(x.message) for x in w if 'torchfast' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'reference' in msgs[0] and 'pip install' in msgs[0], msgs[0]\n"
        "p = [torch.ones(3, requires_grad=True)]; p[0].grad = torch.ones(3)\n"
        "torchfast.optim.SGD(p, lr=0.5, momentum=0.9).step()\n"
        "assert torch.allclose(p[0], torch.full((3,), 0.5))\n"
        "print('ok')\n"
    )
    out = run_python(code, cwd=str(tmp_path), PYTHONPATH=str(tmp_path))
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(not _loader.STATE.loaded, reason="kernels not built")
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_each_cpu_library_is_correct(isa):
    """The library for each CPU capability torch can run at (ATEN_CPU_CAPABILITY) loads and is right."""
    if isa not in _loader.STATE.build_info.get("cpu_isas", []):
        pytest.skip(f"{isa} library not built")
    if isa == "avx512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX512")
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    code = (
        "import torch, torchfast\n"
        "print(torchfast.info()['cpu_library'])\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    p = [torch.randn(1000, 37).to(dt).requires_grad_()]; q = [p[0].detach().clone().requires_grad_()]\n"
        "    o1 = torchfast.optim.AdamW(p, lr=0.01); o2 = torch.optim.AdamW(q, lr=0.01, fused=True)\n"
        "    for i in range(5):\n"
        "        p[0].grad = torch.randn_like(p[0]); q[0].grad = p[0].grad.clone(); o1.step(); o2.step()\n"
        "    e = torch.finfo(dt).eps\n"
        "    torch.testing.assert_close(p[0], q[0], rtol=2 * e, atol=2 * e)\n"
    )
    out = run_python(code, ATEN_CPU_CAPABILITY=isa)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == f"_cpu_{isa}"


def test_every_subpackage_is_installed():
    """pyproject.toml lists the packages pip installs: a new folder of torchfast missing there would be
    absent from a `pip install .` though present in this checkout."""
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pyproject = os.path.join(root, "pyproject.toml")
    if not os.path.isfile(pyproject):
        pytest.skip("not run from a checkout")
    listed = set(tomllib.load(open(pyproject, "rb"))["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, root).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(root, "torchfast"))
             if "__init__.py" in files and "__pycache__" not in d}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
