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
    import platform

    import torch

    from torchfast import bench

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("torchfast bench: --device cuda asked for, but no GPU is available", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    report = {}
    if "optim" in args.suites:
        rows = report["optim"] = bench.optimizer_report(device=device, rounds=args.rounds, cases=args.cases,
                                                        kinds=args.optimizers)
        print(f"Optimizer step, fp32, {device} ({where}), torch {torch.__version__}, median of {args.rounds} "
              "interleaved rounds; GB/s counts 28 B/param for Adam(W), 20 for SGD-momentum.\n")
        print(bench.format_table(rows) + "\n")
    if "clip" in args.suites:
        rows = report["clip"] = bench.clip_report(device=device, rounds=args.rounds)
        print(f"Gradient clipping, ResNet-18 parameter set, fp32, {device} ({where}), median of {args.rounds} "
              "interleaved rounds; GB/s counts 4 B/param per pass (clip_grad_norm_: 1 pass, 3 when it clips; "
              "clipped Adam: 32 B/param).\n")
        print(bench.format_clip_table(rows) + "\n")
    if "norm" in args.suites:
        n, c, hw = args.norm_shape or ((128, 64, 56) if device == "cuda" else (32, 64, 32))
        name = args.norm_dtype or ("bf16" if device == "cuda" else "fp32")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        rows = report["norm"] = bench.norm_report(device=device, rounds=max(5, args.rounds // 2), batch=n,
                                                  channels=c, size=hw, dtype=dtype, with_compile=not args.no_compile)
        print(f"Batch norm + add + ReLU (batch {n}, {c} channels, {hw}x{hw}, {name}) and the cheat sheet's "
              f"ResidualBlock, {device} ({where}), median of {max(5, args.rounds // 2)} interleaved rounds; GB/s "
              f"counts 11 tensor passes of {dtype.itemsize} B per element for the BN forward+backward.\n")
        print(bench.format_norm_table(rows) + "\n")
    if "attention" in args.suites:
        from torchfast import bench_attention as ba
        cuda = device == "cuda"
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            args.attn_dtype or ("bf16" if cuda else "fp32")]
        lengths = args.attn_lengths or ([1024, 4096, 16384] if cuda else [512, 2048])
        rounds = max(3, args.rounds // 4)
        for D in args.attn_head_dims:
            rows = report.setdefault("attention", [])
            new = ba.attention_report(device=device, rounds=rounds, lengths=lengths, D=D, dtype=dtype)
            rows += [dict(r, D=D, dtype=str(dtype)) for r in new]
            print(f"Attention, B=4, H=8, D={D}, {dtype}, {device} ({where}), median of {rounds} interleaved rounds; "
                  "GFLOP/s counts the matmuls (2 GEMMs forward, 7 forward+backward).\n")
            print(ba.format_attention_table(new) + "\n")
        mem_lengths = args.attn_memory_lengths or ([1024, 4096, 16384] if cuda else [512, 2048, 8192])
        rows = report["attention_memory"] = ba.memory_report(device=device, lengths=mem_lengths)
        print(f"Attention peak extra memory, forward+backward, B=4, H=8, D=64, fp32, {device}.\n")
        print(ba.format_memory_table(rows) + "\n")
    if "models" in args.suites:
        from torchfast import bench_models as bm

        rounds = max(5, args.rounds // 2)
        rows, infer_prof = bm.inference_report(rounds=rounds)
        train_rows, train_prof, copy_share = bm.train_report(rounds=rounds)
        amp_rows, amp_prof, _ = bm.train_report(rounds=rounds, amp=True)
        rows += train_rows + amp_rows
        if args.job_runs:
            rows += bm.job_report(runs=args.job_runs)
        report["models"] = rows
        print(f"\nWhole model: the cheat sheet's ComplexNetwork, plain torch vs torchfast, CPU ({where}), torch "
              f"{torch.__version__}, median of {rounds} interleaved rounds.\n")
        print(bm.format_rows(rows) + "\n")
        print(bm.format_profile("torchfast inference, top ops (self CPU)", infer_prof))
        print(bm.format_profile("torchfast train step, top ops (self CPU)", train_prof))
        print(bm.format_profile("torchfast train step under bf16 autocast, top ops", amp_prof))
        print(f"aten::copy_ in the torchfast train step: {100 * copy_share:.1f}% of self CPU time\n")
    if "fsdp" in args.suites:
        from torchfast import bench_sharded

        rounds = max(5, args.rounds // 2)
        sharded = report["fsdp"] = bench_sharded.sharded_report(nproc=args.fsdp_nproc, rounds=rounds)
        print(f"\nSharded (FSDP2 fully_shard), ResNet-18 parameter set over {sharded['world_size']} processes, "
              f"fp32, {sharded['device']}, torch {sharded['torch']}; the slowest rank's median of {rounds} "
              "interleaved rounds; all-reduces counted over one call.\n")
        print(bench_sharded.format_table(sharded["rows"]) + "\n")
    if "deploy" in args.suites:
        from torchfast import bench_deploy

        rounds = max(5, args.rounds // 2)
        report["deploy"] = bench_deploy.deploy_report(models=args.deploy_models, rounds=rounds)
        print(f"\nDeployment, CPU ({where}), torch {torch.__version__}, median of {rounds} interleaved rounds; "
              "x = latency relative to the plain-torch network in eager fp32.\n")
        print(bench_deploy.format_report(report["deploy"]) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
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
    for name in ("epochs", "batch_size", "nproc", "synthetic"):
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
                       eager=args.eager, synthetic=args.synthetic, resume=args.resume, seed=args.seed, device=device,
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
    p_train = sub.add_parser("train", help="train ComplexNetwork (fused layers) on scikit-learn's digits")
    p_train.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    p_train.add_argument("--epochs", type=int, default=12)
    p_train.add_argument("--batch-size", type=int, default=64)
    p_train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the OneCycleLR schedule")
    p_train.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (fp16 needs a GPU)")
    p_train.add_argument("--eager", action="store_true", help="the same network from plain torch modules")
    p_train.add_argument("--synthetic", type=int, metavar="SIZE", help="random SIZExSIZE RGB images instead of digits")
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
