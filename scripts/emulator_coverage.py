"""Runs the emulated CUDA tests and prints what the emulator executed, per launch site of csrc/:
launches, blocks and threads, as a Markdown table. Exits non-zero when a tf_launch site of the GPU
build (csrc/*/*_cuda.cu, csrc/*/*.cuh) never ran, or when the tests fail.

    python scripts/emulator_coverage.py [pytest arguments]
"""
import glob
import os
import re
import sys
from collections import defaultdict

import pytest

from torchfast.testing import cuda_emulator as emu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every family's emulated tests (tests/test_emulated_<family>.py): a new family is covered by adding its file
TESTS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_emulated_*.py")))


def kernel_expression(text):
    """The first argument of a tf_launch call: its text up to the first top-level comma."""
    depth, out = 0, []
    for c in text:
        depth += c in "<([" and 1 or 0
        depth -= c in ">)]" and 1 or 0
        if c == "," and depth == 0:
            break
        out.append(c)
    return " ".join("".join(out).split())


def launch_sites():
    sites = set()
    files = glob.glob(os.path.join(ROOT, "csrc", "*", "*_cuda.cu")) + glob.glob(os.path.join(ROOT, "csrc", "*", "*.cuh"))
    for path in sorted(files):
        rel = os.path.relpath(path, ROOT)
        if rel.startswith("csrc/emulator") or rel.endswith("launch.cuh"):
            continue
        text = open(path).read()
        for m in re.finditer(r"\btf_launch\(", text):
            sites.add((rel, kernel_expression(text[m.end():])))
    return sites


def main():
    totals = defaultdict(lambda: defaultdict(int))

    def drain():
        for key, stat in emu.launch_stats().items():
            where, kernel = key.split(" ", 1)
            site = (where.rsplit(":", 1)[0], " ".join(kernel.split()))
            for k, v in stat.items():
                totals[site][k] += v

    reset = emu.reset_launch_stats

    def draining_reset():
        drain()
        reset()

    emu.reset_launch_stats = draining_reset
    reset()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *[os.path.join(ROOT, t) for t in TESTS], *sys.argv[1:]])
    drain()
    print("\n| launch site | kernel | launches | blocks | threads |\n|---|---|---:|---:|---:|")
    for (where, kernel), stat in sorted(totals.items()):
        if not where.startswith("csrc/emulator"):
            print(f"| {where} | `{kernel}` | {stat['launches']} | {stat['blocks']} | {stat['threads']} |")
    missing = sorted(launch_sites() - set(totals))
    for where, kernel in missing:
        print(f"| {where} | `{kernel}` | **never run** | | |")
    if missing:
        print(f"\n{len(missing)} launch site(s) never ran under the emulator", file=sys.stderr)
    return int(code) or (1 if missing else 0)


if __name__ == "__main__":
    sys.exit(main())
