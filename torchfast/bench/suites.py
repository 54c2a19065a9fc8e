"""Each suite of `torchfast bench` as one function: it runs the suite's measurements and returns its
sections (a caption and a markdown table each) and rows, which the command prints and `--report`
writes out with a plot."""
from __future__ import annotations

import platform
from dataclasses import dataclass, field

import torch

SUITES = ("optim", "clip", "norm", "attention", "models", "deploy", "fsdp")
DEFAULT_SUITES = ("optim", "clip", "norm", "attention")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Options:
    """What the suites take from the command line (defaults: `torchfast bench`'s)."""
    device: str = "cpu"
    rounds: int = 20
    cases: tuple = ("resnet18", "2000x4096")
    optimizers: tuple = ("adam", "adamw", "sgd_momentum")
    job_runs: int = 0
    deploy_models: tuple = ("digits", "complexnet", "resblock256")
    attn_lengths: tuple = None
    attn_memory_lengths: tuple = None
    attn_head_dims: tuple = (64,)
    attn_dtype: str = None
    norm_shape: tuple = None
    norm_dtype: str = None
    no_compile: bool = False
    fsdp_nproc: int = 2
    zoo: tuple = ("resnet18", "resnet50", "vit_tiny")


@dataclass
class Suite:
    name: str
    sections: list = field(default_factory=list)  # (caption, markdown table or text)
    rows: object = None  # what `--json` writes for the suite
    plot_rows: list = field(default_factory=list)  # (label, ratio, (band low, band high) or None, baseline)

    def add(self, caption: str, table: str) -> None:
        self.sections.append((caption, table))

    def text(self) -> str:
        return "\n".join(f"{caption}\n\n{table}\n" for caption, table in self.sections)


def where(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor string. Worth naming:
    torch's BLAS and oneDNN pick different kernels on Intel and AMD CPUs of the same ISA."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio_rows(rows, label, ratio_key, baseline, skip=()):
    return [(label(r), r[ratio_key], r.get("band"), baseline) for r in rows
            if r.get(ratio_key) is not None and r[ratio_key] == r[ratio_key] and r.get("impl") not in skip]


def optim(o: Options) -> Suite:
    from torchfast.bench import optim as bench_optim

    s = Suite("optim")
    rows = s.rows = bench_optim.optimizer_report(device=o.device, rounds=o.rounds, cases=o.cases, kinds=o.optimizers)
    s.add(f"Optimizer step, fp32, {o.device} ({where(o.device)}), torch {torch.__version__}, median of {o.rounds} "
          "interleaved rounds; GB/s counts 28 B/param for Adam(W), 20 for SGD-momentum.", bench_optim.format_table(rows))
    s.plot_rows = _ratio_rows(rows, lambda r: f"{r['optimizer']} {r['case']}: {r['impl']}", "vs_foreach",
                              "torch foreach", skip=("torch-foreach",))
    return s


def clip(o: Options) -> Suite:
    from torchfast.bench import clip as bench_clip

    s = Suite("clip")
    rows = s.rows = bench_clip.clip_report(device=o.device, rounds=o.rounds)
    s.add(f"Gradient clipping, ResNet-18 parameter set, fp32, {o.device} ({where(o.device)}), median of {o.rounds} "
          "interleaved rounds; GB/s counts 4 B/param per pass (clip_grad_norm_: 1 pass, 3 when it clips; "
          "clipped Adam: 32 B/param).", bench_clip.format_table(rows))
    s.plot_rows = _ratio_rows(rows, lambda r: f"{r['bench']}: {r['impl']}", "ratio", "torch", skip=("torch",))
    s.plot_rows = [p for p in s.plot_rows if not p[0].endswith("clip_grad_norm_ + Adam(fused=True)")]
    return s


def norm(o: Options) -> Suite:
    from torchfast.bench import norm as bench_norm

    s = Suite("norm")
    n, c, hw = o.norm_shape or ((128, 64, 56) if o.device == "cuda" else (32, 64, 32))
    name = o.norm_dtype or ("bf16" if o.device == "cuda" else "fp32")
    dtype = DTYPES[name]
    rounds = max(5, o.rounds // 2)
    rows = s.rows = bench_norm.norm_report(device=o.device, rounds=rounds, batch=n, channels=c, size=hw, dtype=dtype,
                                           with_compile=not o.no_compile)
    s.add(f"Batch norm + add + ReLU (batch {n}, {c} channels, {hw}x{hw}, {name}) and the cheat sheet's "
          f"ResidualBlock, {o.device} ({where(o.device)}), median of {rounds} interleaved rounds; GB/s "
          f"counts 11 tensor passes of {dtype.itemsize} B per element for the BN forward+backward.",
          bench_norm.format_table(rows))
    s.plot_rows = _ratio_rows(rows, lambda r: f"{r['bench']}: {r['impl']}", "ratio", "eager / the seed block",
                              skip=("eager", "seed block (eager)"))
    return s


def attention(o: Options) -> Suite:
    from torchfast.bench import attention as ba

    s = Suite("attention", rows={})
    cuda = o.device == "cuda"
    dtype = DTYPES[o.attn_dtype or ("bf16" if cuda else "fp32")]
    lengths = o.attn_lengths or ([1024, 4096, 16384] if cuda else [512, 2048])
    rounds = max(3, o.rounds // 4)
    rows = s.rows["attention"] = []
    for D in o.attn_head_dims:
        new = ba.attention_report(device=o.device, rounds=rounds, lengths=lengths, D=D, dtype=dtype)
        rows += [dict(r, D=D, dtype=str(dtype)) for r in new]
        s.add(f"Attention, B=4, H=8, D={D}, {dtype}, {o.device} ({where(o.device)}), median of {rounds} interleaved "
              "rounds; GFLOP/s counts the matmuls (2 GEMMs forward, 7 forward+backward).", ba.format_attention_table(new))
    mem_lengths = o.attn_memory_lengths or ([1024, 4096, 16384] if cuda else [512, 2048, 8192])
    memory = s.rows["attention_memory"] = ba.memory_report(device=o.device, lengths=mem_lengths)
    s.add(f"Attention peak extra memory, forward+backward, B=4, H=8, D=64, fp32, {o.device}.",
          ba.format_memory_table(memory))
    s.plot_rows = _ratio_rows(rows, lambda r: f"D={r['D']} L={r['L']} {r['pass']}: {r['impl']}", "vs_sdpa",
                              "torch SDPA", skip=("torch SDPA",))
    return s


def models(o: Options) -> Suite:
    from torchfast.bench import models as bm

    s = Suite("models")
    # whole-model rounds are cheap (0.1-1 s each): this host's noise comes in bursts of seconds, so
    # more rounds, and more again for inference, steady the medians
    rounds, infer_rounds = max(5, o.rounds), max(10, 2 * o.rounds)
    rows, infer_prof = bm.inference_report(rounds=infer_rounds)
    train_rows, train_prof, copy_share = bm.train_report(rounds=rounds)
    amp_rows, amp_prof, _ = bm.train_report(rounds=rounds, amp=True)
    rows += train_rows + amp_rows
    if o.job_runs:
        rows += bm.job_report(runs=o.job_runs)
    zoo_rows, zoo_profiles = bm.zoo_report(models=o.zoo, rounds=rounds, with_compile=not o.no_compile) if o.zoo \
        else ([], {})
    s.rows = rows + zoo_rows
    s.add(f"Whole model: the cheat sheet's ComplexNetwork, plain torch vs torchfast, CPU ({where('cpu')}), torch "
          f"{torch.__version__}, median of {rounds} interleaved rounds ({infer_rounds} for inference).",
          bm.format_rows(rows))
    s.add("Profiles", "\n".join([
        bm.format_profile("torchfast inference, top ops (self CPU)", infer_prof),
        bm.format_profile("torchfast train step, top ops (self CPU)", train_prof),
        bm.format_profile("torchfast train step under bf16 autocast, top ops", amp_prof),
        f"aten::copy_ in the torchfast train step: {100 * copy_share:.1f}% of self CPU time"]))
    if zoo_rows:
        s.add(f"Models we did not write (torchvision, timm; random init), batch 16, 3x64x64, through torchfast.convert; "
              f"median of {rounds} interleaved rounds; train step = forward, backward, AdamW.", bm.format_rows(zoo_rows))
        s.add("Profiles of the converted models' train steps", "\n".join(
            bm.format_profile(f"{name} (torchfast.convert), train step, top ops (self CPU)", prof)
            for name, prof in zoo_profiles.items()))
    rows = s.rows
    s.plot_rows = _ratio_rows(rows, lambda r: f"{r['bench']}: {r['impl']}", "vs_plain", "plain torch eager",
                              skip=("plain eager", "plain eager + AdamW(fused=True)", "torchfast train --eager", "eager"))
    return s


def deploy(o: Options) -> Suite:
    from torchfast.bench import deploy as bench_deploy

    s = Suite("deploy")
    rounds = max(5, o.rounds // 2)
    report = s.rows = bench_deploy.deploy_report(models=o.deploy_models, rounds=rounds)
    s.add(f"Deployment, CPU ({where('cpu')}), torch {torch.__version__}, median of {rounds} interleaved rounds; "
          "x = latency relative to the plain-torch network in eager fp32.", bench_deploy.format_report(report))
    s.plot_rows = bench_deploy.plot_rows(report)
    return s


def fsdp(o: Options) -> Suite:
    from torchfast.bench import sharded

    s = Suite("fsdp")
    rounds = max(5, o.rounds // 2)
    report = s.rows = sharded.sharded_report(nproc=o.fsdp_nproc, rounds=rounds)
    s.add(f"Sharded (FSDP2 fully_shard), ResNet-18 parameter set over {report['world_size']} processes, fp32, "
          f"{report['device']}, torch {report['torch']}; the slowest rank's median of {rounds} interleaved rounds; "
          "all-reduces counted over one call.", sharded.format_table(report["rows"]))
    s.plot_rows = _ratio_rows(report["rows"], lambda r: f"{r['what']}: {r['impl']}", "vs_foreach", "torch foreach",
                              skip=("torch-foreach",))
    return s


RUNNERS = {"optim": optim, "clip": clip, "norm": norm, "attention": attention, "models": models, "deploy": deploy,
           "fsdp": fsdp}
