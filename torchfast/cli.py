"""The `torchfast` command: `train` (the main job), `info` (build configuration, active kernels) and
`bench` (the kernels against PyTorch, as markdown tables)."""
from __future__ import annotations

import argparse
import json
import os
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
        print(f"  {op:<22} {', '.join(devices) if devices else 'reference only'}")
    return 0


def _bench(args) -> int:
    import torch

    from torchfast.bench import suites

    if args.device == "cuda" and not torch.cuda.is_available():
        print("torchfast bench: --device cuda asked for, but no GPU is available", file=sys.stderr)
        return 2
    options = suites.Options(**{name: getattr(args, name) for name in suites.Options.__dataclass_fields__})
    done, report = [], {}
    for name in [s for s in suites.SUITES if s in args.suites]:
        suite = suites.RUNNERS[name](options)
        print(suite.text())
        done.append(suite)
        if name == "attention":
            report.update(suite.rows)
        else:
            report[name] = suite.rows
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.report:
        from torchfast.bench import report as bench_report

        path = bench_report.write(args.report, done, args.command_line, args.device)
        print(f"report: {path} (and one plot per suite beside it)")
    return 0


def argv_for_ranks(argv: list) -> list:
    """The command line without --nproc (and without --out, which the launcher passes explicitly)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--out"):
            skip = True
            continue
        if a.startswith("--nproc=") or a.startswith("--out="):
            continue
        out.append(a)
    return out


def _train_device(args) -> str:
    import torch
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_train_args(parser, args) -> None:
    """User errors get argparse's one-line message (and exit status 2), not a traceback."""
    for name in ("epochs", "batch_size", "nproc", "synthetic", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.amp == "fp16" and _train_device(args) == "cpu":
        parser.error("--amp fp16 needs a CUDA device (use --amp bf16 on the CPU)")
    if args.resume is not None and not (os.path.isfile(args.resume) or os.path.isdir(args.resume)
                                        or os.path.isdir(args.resume + ".old")):
        parser.error(f"--resume {args.resume}: no such checkpoint file (or sharded checkpoint directory)")
    if args.synthetic is not None and args.data not in ("digits", "synthetic"):
        parser.error(f"--synthetic SIZE is --data synthetic --image-size SIZE; it does not go with --data {args.data}")
    if args.data not in ("digits", "synthetic") and not os.path.isdir(args.data):
        parser.error(f"--data {args.data}: not 'digits', 'synthetic' or a directory of images (one folder per class)")
    if args.data == "digits" and args.image_size is not None and args.synthetic is None:
        parser.error("--image-size does not apply to the digits (8x8); use --data synthetic or an image folder")
    if args.fsdp and args.nproc < 2 and "RANK" not in os.environ:
        parser.error("--fsdp shards the model over processes: give --nproc 2 or more")


def _train(args) -> int:
    import time

    import torch

    from torchfast.train.job import JobConfig, run

    device = _train_device(args)
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if args.nproc > 1 and "RANK" not in os.environ:
        # relaunch this command under torchrun, one process per rank, all writing to one run directory
        from torch.distributed.run import main as torchrun

        rest = [a for a in (argv_for_ranks(sys.argv[1:]))] + ["--out", out]
        torchrun(["--standalone", f"--nproc_per_node={args.nproc}", "-m", "torchfast"] + rest)
        return 0
    config = JobConfig(out=out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, amp=args.amp,
                       eager=args.eager, synthetic=args.synthetic, model=args.model, data=args.data,
                       image_size=args.image_size, resume=args.resume, seed=args.seed, device=device,
                       fsdp=args.fsdp)
    try:
        summary = run(config)
    except ValueError as e:  # a run that cannot go on as asked (e.g. --resume with another schedule)
        print(f"torchfast train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: resume with --resume {os.path.join(out, 'checkpoints', 'interrupted.pt')}",
              file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":
        return 0
    acc = summary["val_accuracy"]
    print(f"done: {summary['epochs']} epochs in {summary['seconds']:.1f} s, {summary['samples_per_s']:.0f} samples/s"
          + (f", val_accuracy {acc:.4f}" if acc is not None else "") + f", val_loss {summary['val_loss']:.4f}")
    print(f"run directory: {summary['out']} (summary.json, checkpoints/, tensorboard/)")
    return 0


def _export(args) -> int:
    from torchfast.deploy.from_run import ExportError, export_run

    if args.prune is not None and not 0.0 <= args.prune < 1.0:
        print(f"torchfast export: error: --prune takes a fraction in [0, 1), got {args.prune}", file=sys.stderr)
        return 2
    try:
        export_run(args.run, args.onnx, quantize_method=args.quantize, prune_amount=args.prune, opset=args.opset,
                   exporter=args.exporter)
    except ExportError as e:
        print(f"torchfast export: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="torchfast", description="torchfast command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="torch version, build configuration and active kernels per device")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_bench = sub.add_parser("bench", help="time torchfast's kernels against PyTorch (optimizers, clipping, batch norm, attention)")
    p_bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p_bench.add_argument("--rounds", type=int, default=20, help="timed rounds per implementation (median reported)")
    p_bench.add_argument("--cases", nargs="+", default=["resnet18", "2000x4096"], choices=["resnet18", "2000x4096"])
    p_bench.add_argument("--optimizers", nargs="+", default=["adam", "adamw", "sgd_momentum"],
                         choices=["adam", "adamw", "sgd_momentum"])
    p_bench.add_argument("--suites", nargs="+", default=["optim", "clip", "norm", "attention"],
                         choices=["optim", "clip", "norm", "attention", "models", "deploy", "fsdp"],
                         help="optimizer steps, gradient clipping, fused batch norm / ResidualBlock, attention; "
                              "models (whole ComplexNetwork, inference and train step, with profiles); deploy "
                              "(ONNX and int8 inference, not in the default set: it trains and compiles); fsdp "
                              "(optimizer step and clipping on FSDP2 shards, in --fsdp-nproc processes)")
    p_bench.add_argument("--zoo", nargs="*", default=["resnet18", "resnet50", "vit_tiny"],
                         choices=["resnet18", "resnet50", "vit_tiny"],
                         help="with --suites models: torchvision/timm models through torchfast.convert (none: skip)")
    p_bench.add_argument("--fsdp-nproc", type=int, default=2, metavar="N", help="processes for --suites fsdp")
    p_bench.add_argument("--job-runs", type=int, default=0, metavar="N",
                         help="with --suites models: also time N runs each of `torchfast train` and `--eager`")
    p_bench.add_argument("--deploy-models", nargs="+", default=["digits", "complexnet", "resblock256"],
                         choices=["digits", "complexnet", "resblock256"])
    p_bench.add_argument("--attn-lengths", nargs="+", type=int,
                         help="attention sequence lengths (default: 512 2048 on the CPU, 1024 4096 16384 on CUDA)")
    p_bench.add_argument("--attn-memory-lengths", nargs="+", type=int,
                         help="lengths for the peak-memory table (default: 512 2048 8192; CUDA 1024 4096 16384)")
    p_bench.add_argument("--attn-head-dims", nargs="+", type=int, default=[64])
    p_bench.add_argument("--attn-dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 on the CPU, bf16 on CUDA")
    p_bench.add_argument("--norm-shape", nargs=3, type=int, metavar=("N", "C", "HW"),
                         help="batch norm / ResidualBlock input (N, C, HW, HW); default: 32 64 32 on the CPU, "
                              "128 64 56 on CUDA")
    p_bench.add_argument("--norm-dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 on the CPU, bf16 on CUDA")
    p_bench.add_argument("--no-compile", action="store_true",
                         help="leave out the torch.compile rows (their compilation takes minutes on a cold cache)")
    p_bench.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p_bench.add_argument("--report", metavar="DIR", help="also write DIR/RESULTS.md (machine, torch, commit, command, "
                         "the tables) and DIR/<suite>.png (ratio plots with the noise band across rounds)")
    p_train = sub.add_parser("train", help="train ComplexNetwork (fused layers) on scikit-learn's digits")
    p_train.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    p_train.add_argument("--epochs", type=int, default=12)
    p_train.add_argument("--batch-size", type=int, default=64)
    p_train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the OneCycleLR schedule")
    p_train.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (fp16 needs a GPU)")
    p_train.add_argument("--eager", action="store_true", help="the same network from plain torch modules")
    p_train.add_argument("--model", choices=["complexnet", "resnet18"], default="complexnet",
                         help="the cheat sheet's ComplexNetwork, or torchvision's ResNet-18 (converted by "
                              "torchfast.convert; a small-image stem below 64x64)")
    p_train.add_argument("--data", default="digits", metavar="digits|synthetic|PATH",
                         help="scikit-learn's digits, random images, or a directory of images with one subfolder "
                              "per class (torchvision ImageFolder; train/ and val/ subfolders are used as the split)")
    p_train.add_argument("--image-size", type=int, metavar="N",
                         help="images are NxN (synthetic: default 32; an image folder: resized, default 64)")
    p_train.add_argument("--synthetic", type=int, metavar="SIZE", help="random SIZExSIZE RGB images instead of digits "
                         "(= --data synthetic --image-size SIZE)")
    p_train.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (e.g. RUN/checkpoints/last.pt, "
                         "or last.dcp of an --fsdp run)")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p_train.add_argument("--nproc", type=int, default=1,
                         help="processes for DistributedDataParallel (launched through torch.distributed.run)")
    p_train.add_argument("--fsdp", action="store_true",
                         help="shard parameters, gradients and optimizer state over the --nproc processes (FSDP2) "
                              "instead of DDP; checkpoints are torch.distributed.checkpoint directories (*.dcp)")
    p_export = sub.add_parser("export", help="deploy a `torchfast train` run: ONNX export, optional pruning and "
                                             "int8 quantization, verified and measured")
    p_export.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    p_export.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where the fp32 ONNX model goes")
    p_export.add_argument("--quantize", choices=["onnx-static", "pt2e", "dynamic"],
                          help="also an int8 model (ONNX methods: written beside OUT.onnx)")
    p_export.add_argument("--prune", type=float, metavar="AMOUNT", help="global L1 pruning of this fraction first")
    p_export.add_argument("--opset", type=int, help="ONNX opset (default 18; 23 uses the Attention node)")
    p_export.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    args = parser.parse_args(argv)
    args.command_line = "torchfast " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.command == "export":
        return _export(args)
    if args.command == "train":
        _check_train_args(p_train, args)
        return _train(args)
    if args.command == "info":
        return _print_info(args.json)
    if args.command == "bench":
        return _bench(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
