"""The `torchfast` command: `torchfast info` (build configuration and active kernels)."""
from __future__ import annotations

import argparse
import json
import sys


def _print_info(as_json: bool) -> int:
    import torchfast

    info = torchfast.info()
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    build = info["build"] or {}
    print(f"torchfast {info['torchfast']}")
    print(f"torch     {info['torch']} (CUDA {info['torch_cuda'] or 'none'}; GPU available: {info['cuda_available']})")
    print(f"CPU       capability {info['cpu_capability']}; kernel library {info['cpu_library'] or 'none'}")
    if build:
        cuda = (f"on, arch {build.get('cuda_arch_list')}" if build.get("cuda")
                else f"off ({build.get('cuda_reason')})")
        print(f"build     torch {build.get('torch_version')}, CUDA {cuda}, CPU ISAs {','.join(build.get('cpu_isas', []))}, "
              f"jobs {build.get('max_jobs')}")
    else:
        print("build     none found")
    print(f"status    {info['status']}")
    print("kernels:")
    for op, devices in info["kernels"].items():
        print(f"  {op:<14} {', '.join(devices) if devices else 'reference only'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="torchfast", description="torchfast command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="torch version, build configuration and active kernels per device")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _print_info(args.json)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
