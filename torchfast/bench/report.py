"""`torchfast bench --report DIR`: the suites' tables as DIR/RESULTS.md (machine, torch, commit, command,
date) and one plot per suite, DIR/<suite>.png: each torchfast row's time as a ratio to the suite's
baseline (below 1 is faster), with the 25-75% band of that ratio across the interleaved rounds."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

import torchfast
from torchfast.bench.suites import Suite, where


def commit() -> str:
    """The checkout's commit (with `+changes` when the tree differs), or "unknown" outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(torchfast.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def plot(suite: Suite, path: str, device_label: str) -> bool:
    """Writes the suite's ratio plot to `path`; False when the suite has nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = suite.plot_rows
    if not rows:
        return False
    labels = [r[0] for r in rows]
    ratios = [r[1] for r in rows]
    # (the ratio of medians can lie outside the band of per-round ratios: the bar then starts at the ratio)
    low = [max(0.0, r[1] - r[2][0]) if r[2] else 0.0 for r in rows]
    high = [max(0.0, r[2][1] - r[1]) if r[2] else 0.0 for r in rows]
    baselines = sorted({r[3] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.32 * len(rows)))
    y = range(len(rows))
    ours = ["torchfast" in label.split(": ", 1)[-1] for label in labels]  # torchfast's rows vs torch's other paths
    colors = ["tab:blue" if o else "tab:gray" for o in ours]
    ax.barh(list(y), ratios, xerr=[low, high], color=colors, alpha=0.85, ecolor="black", capsize=2)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="tab:blue", label="torchfast"), Patch(color="tab:gray", label="torch's other paths")],
              fontsize=7, loc="lower right")
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"time relative to {' / '.join(baselines)} (below 1: faster); bars: 25-75% of the per-round ratio")
    ax.set_title(f"torchfast bench --suites {suite.name} ({device_label})", fontsize=9)
    for i, (r, h) in enumerate(zip(ratios, high)):
        ax.text(r + h, i, f"  {r:.2f}", va="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long row labels: nothing cut off
    plt.close(fig)
    return True


def write(folder: str, suites: list, command: str, device: str) -> str:
    """Writes folder/RESULTS.md and folder/<suite>.png; returns the markdown file's path."""
    os.makedirs(folder, exist_ok=True)
    gpu = device == "cuda"
    device_label = f"GPU: {where(device)}" if gpu else f"CPU: {where(device)}"
    lines = ["# torchfast benchmark report", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {platform.node() or 'unknown'}, {platform.machine()}, {os.cpu_count()} CPUs; {device_label}",
             f"- torch {torch.__version__}, torchfast {torchfast.__version__}, commit {commit()}",
             f"- command: `{command}`", "",
             "Medians of interleaved rounds (the implementations take turns, so noise falls on all alike); "
             "ratios are within one run.", ""]
    lines += [f"## {'GPU' if gpu else 'CPU'} figures", ""]
    for suite in suites:
        lines += [f"### {suite.name}", ""]
        if plot(suite, os.path.join(folder, f"{suite.name}.png"), device_label):
            lines += [f"![{suite.name}]({suite.name}.png)", ""]
        lines += [suite.text(), ""]
    path = os.path.join(folder, "RESULTS.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path
