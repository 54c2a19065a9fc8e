"""Build torchfast's C++/CUDA kernels with torch.utils.cpp_extension (ninja).

Libraries built:
  torchfast/_C                 operator schemas (csrc/torchfast.cpp) and, when CUDA is on, the CUDA kernels
  torchfast/_cpu_<isa>         the CPU kernels, compiled once per CPU capability (default, avx2,
                               avx512); the package loads the one torch reports for this machine

Switches (environment variables):
  TORCHFAST_CUDA=1|0           force / skip the CUDA kernels (default: build when nvcc and a CUDA
                               build of torch are present; no GPU is needed to compile)
  TORCH_CUDA_ARCH_LIST         CUDA architectures (default: the visible GPU's, else "9.0")
  TORCHFAST_CPU_ISAS           CPU capabilities to build, e.g. "avx2,avx512" (default: all three)
  TORCHFAST_EMULATOR=1         also build torchfast/_emulator: the CUDA sources compiled as C++ for
                               the host-side CUDA emulator (csrc/emulator/), for the tests
  TORCHFAST_EMULATOR_SANITIZERS=1  and torchfast/_emulator_sanitized: the same under ASan + UBSan
  MAX_JOBS                     parallel compile jobs (default: number of CPUs)
  CUDA_HOME                    CUDA toolkit root (default: resolved from the real nvcc)
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def log(msg):
    print(f"[torchfast build] {msg}", file=sys.stderr, flush=True)


def resolve_cuda_home():
    """Find the toolkit root from the real nvcc.

    `nvcc` on PATH may be a wrapper script (here /usr/local/bin/nvcc), from which torch would infer
    CUDA_HOME=/usr/local. nvcc's dry run prints the TOP it really runs from.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in ("/usr/local/cuda/bin/nvcc",):
            if os.path.exists(cand):
                nvcc = cand
                break
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


# CUDA_HOME must be set before torch.utils.cpp_extension is imported: it reads it at import time.
_cuda_switch = os.environ.get("TORCHFAST_CUDA", "").strip()
_cuda_home = resolve_cuda_home() if _cuda_switch != "0" else None
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    if _cuda_switch == "0":
        return False, "disabled by TORCHFAST_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if not _cuda_home or not os.path.exists(os.path.join(_cuda_home, "bin", "nvcc")):
        reasons.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if reasons:
        if _cuda_switch == "1":
            raise RuntimeError("TORCHFAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"nvcc in {_cuda_home}"


def nvidia_wheel_includes():
    """Header folders of the `nvidia-*` wheels that come with a CUDA torch.

    ATen's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack; the wheels
    carry them (nvidia/cu13/include, or nvidia/<lib>/include for CUDA 12 wheels).
    """
    dirs = []
    for base in sys.path:
        root = os.path.join(base, "nvidia")
        if os.path.isdir(root):
            dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def default_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


# Flags per CPU capability, mirroring how ATen builds its own per-ISA kernels: CPU_CAPABILITY names
# the inline namespace of at::vec so that each variant's Vectorized code stays separate.
CPU_ISAS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cpu_isas():
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    raw = os.environ.get("TORCHFAST_CPU_ISAS", "default,avx2,avx512")
    isas = [s.strip().lower() for s in raw.split(",") if s.strip()]
    bad = [s for s in isas if s not in CPU_ISAS]
    if bad:
        raise RuntimeError(f"TORCHFAST_CPU_ISAS: unknown capability {bad}; choose from {list(CPU_ISAS)}")
    return isas


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


BASE_CXX = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]

build_cuda, cuda_reason = want_cuda()
arch_list = default_arch_list() if build_cuda else None
if build_cuda:
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
isas = cpu_isas()
# _C: the schemas, the Python entry points, device-independent kernels (e.g. Autograd-key ones)
# and, with CUDA, the CUDA kernels. _cpu_<isa>: the CPU kernels (*_cpu.cpp).
cpu_kernel_sources = rel(glob.glob(os.path.join(CSRC, "*", "*_cpu.cpp")))
core_sources = ["csrc/torchfast.cpp", "csrc/python_bindings.cpp"] + rel(
    p for p in glob.glob(os.path.join(CSRC, "*", "*.cpp"))
    if not p.endswith("_cpu.cpp") and os.path.basename(os.path.dirname(p)) != "emulator")
cuda_kernel_sources = rel(glob.glob(os.path.join(CSRC, "*", "*_cuda.cu")))
include_dirs = [CSRC]

ext_modules = []
if build_cuda:
    cuda_includes = nvidia_wheel_includes()
    ext_modules.append(CUDAExtension(
        "torchfast._C",
        core_sources + cuda_kernel_sources,
        include_dirs=include_dirs + cuda_includes,
        extra_compile_args={"cxx": BASE_CXX, "nvcc": ["-O3", "-lineinfo"]},
    ))
else:
    ext_modules.append(CppExtension("torchfast._C", core_sources,
                                    include_dirs=include_dirs, extra_compile_args={"cxx": BASE_CXX}))
for isa in isas:
    ext_modules.append(CppExtension(
        f"torchfast._cpu_{isa}",
        cpu_kernel_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": BASE_CXX + CPU_ISAS[isa]},
        extra_link_args=["-fopenmp"],
    ))

# The CUDA emulator's libraries (tests only). Each variant compiles its own copy of every source
# through a generated one-line translation unit, so that no object file is shared between variants
# (or with _C, which compiles csrc/torchfast.cpp with other flags): the .cu files compile as C++.
EMULATOR_VARIANTS = {
    "_emulator": ["-O2"],
    "_emulator_sanitized": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                            "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined"],
}


def emulator_variants():
    if os.environ.get("TORCHFAST_EMULATOR", "0") in ("", "0"):
        return []
    variants = ["_emulator"]
    if os.environ.get("TORCHFAST_EMULATOR_SANITIZERS", "0") not in ("", "0"):
        variants.append("_emulator_sanitized")
    return variants


def emulator_sources(variant):
    sources = (["torchfast.cpp"] + [f"emulator/{f}" for f in ("runtime.cpp", "fiber.cpp", "emulator_library.cpp",
                                                                 "probes.cu")]
               + [os.path.relpath(p, CSRC) for p in sorted(glob.glob(os.path.join(CSRC, "*", "*_cuda.cu")))])
    out_dir = os.path.join(HERE, "build", "emulator_tu", variant)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for src in sources:
        path = os.path.join(out_dir, src.replace("/", "__").replace(".", "_") + ".cpp")
        text = f'// generated by setup.py: {src} for the CUDA emulator\n#include "emulator/runtime.h"\n#include "{src}"\n'
        if not os.path.exists(path) or open(path).read() != text:  # unchanged files keep ninja's state
            with open(path, "w") as f:
                f.write(text)
        paths.append(os.path.relpath(path, HERE))
    return paths


emulators = emulator_variants()
for variant in emulators:
    flags = EMULATOR_VARIANTS[variant]
    ext_modules.append(CppExtension(
        f"torchfast.{variant}",
        emulator_sources(variant),
        include_dirs=[os.path.join(CSRC, "emulator", "include"), CSRC],
        define_macros=[("TORCHFAST_EMULATOR", "1"), ("TORCHFAST_NAMESPACE", "torchfast_emu")],
        extra_compile_args={"cxx": flags + ["-fvisibility=hidden", "-Wno-unknown-pragmas"]},
        extra_link_args=[f for f in flags if f.startswith("-fsanitize")],
    ))

BUILD_INFO = {
    "torch_version": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda": build_cuda,
    "cuda_reason": cuda_reason,
    "cuda_home": _cuda_home if build_cuda else None,
    "cuda_arch_list": arch_list,
    "cpu_isas": isas,
    "emulator": emulators,
    "max_jobs": os.environ.get("MAX_JOBS") or str(os.cpu_count()),
    "python": sys.version.split()[0],
}
log(json.dumps(BUILD_INFO, indent=None))


class TorchfastBuildExt(BuildExtension):
    """BuildExtension that also records the build configuration next to the libraries.

    At import, torchfast compares the recorded torch version with the running one and falls back to
    the reference path on mismatch (an ABI mismatch would otherwise crash or misbehave).
    """

    def run(self):
        super().run()
        pkg_dir = os.path.join(HERE, "torchfast") if self.inplace else os.path.join(self.build_lib, "torchfast")
        os.makedirs(pkg_dir, exist_ok=True)
        with open(os.path.join(pkg_dir, "_build_info.json"), "w") as f:
            json.dump(BUILD_INFO, f, indent=2)


setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": TorchfastBuildExt.with_options(use_ninja=True)},
)
