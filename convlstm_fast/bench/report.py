"""Turning a benchmark result (the dict :func:`convlstm_fast.bench.suite.run_suite` returns) into
markdown tables, a JSON file and PNG plots. Plots are drawn from the result dict only, so they
can be redrawn from a saved JSON (``plot_latency(json.load(f), path)``)."""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

from .cases import OPTIONS
from .roofline import roofline_markdown

FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"


def _millions(value: float) -> str:
    return f"{value / 1e6:,.1f}M"


def _printed(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.0f}M"


def table1_markdown(rows: list[dict]) -> str:
    lines = [
        "Table 1 (Cin = Cout = 256, K = 3, 28x28; per step and sample)",
        "",
        "| cell | weights (exact) | paper Params | paper Mult-Adds (weights x 28*28) | paper printed "
        "| true MACs per step | paper / true |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['weights']:,} | {r['weights'] / 1e6:.3f}M | "
            f"{_millions(r['paper_mult_adds'])} | {_printed(r['paper_printed_mult_adds'])} | "
            f"{_millions(r['true_mult_adds'])} | {r['overstatement']:.2f}x |")
    return "\n".join(lines)


def _timing(record: dict | None) -> str:
    if record is None:
        return "-"
    return f"{record['median_ms']:.2f} ({record['p20_ms']:.2f}-{record['p80_ms']:.2f})"


def _ratio(record: dict | None) -> str:
    if record is None or record.get("speedup_vs_reference") is None:
        return "-"
    return f"{record['speedup_vs_reference']:.2f}x"


def _backends(result: dict) -> list[str]:
    """The timed backends in the run's order, each followed by its option twins
    (``+recompute``, ``+reverse``, ``+ragged``)."""
    order = []
    for backend in result["config"]["backends"]:
        order += [backend] + [backend + option for option in OPTIONS]
    return [b for b in order if any(r["backend"] == b for r in result["latency"])]


def _over_floor(record: dict | None) -> str:
    if record is None or not record.get("floor_ms"):
        return "-"
    return f"{record['median_ms'] / record['floor_ms']:.1f}"


def latency_markdown(result: dict) -> str:
    """One table per shape: a row per (variant, backend) with the forward and forward+backward
    median (p20-p80) in ms, the speedup over the reference measured in the same run, and the
    state tensors saved for backward per step (KERNELS.md: bytes / (T x one B*C*H*W state))."""
    by_key = {(r["shape"]["label"], r["variant"], r["backend"], r["mode"]): r
              for r in result["latency"]}
    saved = {(s["shape"]["label"], s["variant"], s["backend"]): s["saved_per_step"]
             for s in result.get("saved", [])}
    blocks = []
    for shape in result["config"]["shapes"]:
        label = shape["label"]
        rows = sorted({(v, b) for (lab, v, b, _) in by_key if lab == label},
                      key=lambda vb: (result["config"]["variants"].index(vb[0]),
                                      _backends(result).index(vb[1])))
        desc = (f"B={shape['batch']} T={shape['steps']} Cin={shape['in_channels']} "
                f"C={shape['hidden_channels']} {shape['height']}x{shape['width']} "
                f"K={shape['kernel_size']}")
        lines = [f"Cell latency, {label}: {desc}, {result['config']['dtype']}, "
                 f"{result['environment']['device_name']} (ms: median (p20-p80))", "",
                 "| cell | backend | forward | vs reference | x floor | forward+backward "
                 "| vs reference | x floor | saved/step |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for variant, backend in rows:
            fwd = by_key.get((label, variant, backend, FORWARD))
            both = by_key.get((label, variant, backend, FORWARD_BACKWARD))
            kept = saved.get((label, variant, backend))
            lines.append(f"| {variant} | {backend} | {_timing(fwd)} | {_ratio(fwd)} | "
                         f"{_over_floor(fwd)} | {_timing(both)} | {_ratio(both)} | "
                         f"{_over_floor(both)} | {'-' if kept is None else f'{kept:.2f}'} |")
        floors = [by_key.get((label, v, b, m)) for v, b in rows for m in (FORWARD, FORWARD_BACKWARD)]
        floors = [r for r in floors if r and r.get("floor_ms")]
        if floors:
            ceilings = result.get("ceilings") or {}
            lines += ["", "x floor: median / max(compulsory bytes / copy bandwidth, FLOPs / matmul "
                      f"rate), measured here: {ceilings.get('copy_GBps', 0):.0f} GB/s, "
                      f"{ceilings.get('matmul_TFLOPs', 0):.3g} TFLOP/s "
                      f"({ceilings.get('matmul_dtype', '?')}); floors (ms): "
                      + ", ".join(sorted({f"{r['variant']} {r['mode']} {r['floor_ms']:.3g} "
                                          f"({r['floor_bound']})" for r in floors}))]
        blocks.append("\n".join(lines))
        profiled = [by_key.get((label, v, b, m)) for v, b in rows for m in (FORWARD, FORWARD_BACKWARD)]
        profiled = [r for r in profiled if r and r.get("profile")]
        if profiled:
            blocks.append(_profile_markdown(label, profiled))
    if result.get("skipped"):
        lines = ["Skipped:"]
        for s in result["skipped"]:
            lines.append(f"- {s['backend']} / {s['variant']} ({s['shape']}): {s['reason']}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _profile_markdown(label: str, records: list[dict]) -> str:
    """Where one call's time goes on the GPU (harness.device_profile): device time summed over
    its kernels against the call's wall time, the launches, the kernel that takes the most."""
    lines = [f"GPU time of one call, {label} (torch.profiler; busy = kernel time / wall time: "
             "far below 100 % the host holds the GPU back)", "",
             "| cell | backend | mode | wall ms | kernel ms | busy | launches | top kernel (ms, count) |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in records:
        p = r["profile"]
        busy = p["kernel_ms"] / p["wall_ms"] if p["wall_ms"] else 0.0
        top = p["top"][0] if p["top"] else None
        top_text = "-" if top is None else f"`{top['name'][:60]}` ({top['ms']:.3g}, {top['count']})"
        lines.append(f"| {r['variant']} | {r['backend']} | {r['mode']} | {p['wall_ms']:.3g} | "
                     f"{p['kernel_ms']:.3g} | {busy:.0%} | {p['kernels']} | {top_text} |")
    return "\n".join(lines)


def network_markdown(result: dict) -> str:
    network = result.get("network")
    if not network or not network.get("costs"):
        return ""
    costs = network["costs"]
    lines = [f"Full network (Fig. 1), input {costs['input_shape']}, {costs['num_classes']} classes: "
             "parameters and MACs per clip (count_mult_adds; ConvLSTM layers also in the paper's "
             "convention)", "",
             "| cell | parameters | MACs | ConvLSTM 1 true / paper | ConvLSTM 2 true / paper |",
             "|---|---:|---:|---:|---:|"]
    for variant, summary in costs["per_variant"].items():
        stages = {s["name"]: s for s in summary["stages"]}
        c1, c2 = stages["convlstm1"], stages["convlstm2"]
        lines.append(
            f"| {variant} | {summary['total_parameters']:,} | {summary['total_mult_adds'] / 1e9:.2f}G "
            f"| {c1['mult_adds'] / 1e9:.3f}G / {c1['paper_mult_adds'] / 1e9:.3f}G "
            f"| {c2['mult_adds'] / 1e9:.3f}G / {c2['paper_mult_adds'] / 1e9:.3f}G |")
    speed = network.get("throughput")
    if speed:
        cfg = speed["config"]
        lines += ["", f"Throughput, width_mult={cfg['width_mult']}, input [{cfg['batch']}, 3, "
                  f"{cfg['frames']}, {cfg['size']}, {cfg['size']}], backend {cfg['backend']}, "
                  f"{result['config']['dtype']} ({cfg['mult_adds'] / 1e9:.2f} GMAC per clip for cell a)",
                  "", "| cell | ConvLSTM backend | inference clips/s | training clips/s (fwd+bwd) |",
                  "|---|---|---:|---:|"]
        for row in speed["rows"]:
            lines.append(f"| {row['variant']} | {row['convlstm_backend']} | "
                         f"{row['inference_clips_per_s']:.2f} | {row['training_clips_per_s']:.2f} |")
    return "\n".join(lines)


def sweep_markdown(result: dict) -> str:
    if not result.get("sweep"):
        return ""
    lines = ["Forward latency sweep (ms, median)", "",
             "| cell | backend | sweep | B | T | C | HxW | forward |", "|---|---|---|---:|---:|---:|---|---:|"]
    for r in result["sweep"]:
        s = r["shape"]
        lines.append(f"| {r['variant']} | {r['backend']} | {s['label']} | {s['batch']} | "
                     f"{s['steps']} | {s['hidden_channels']} | {s['height']}x{s['width']} | "
                     f"{r['median_ms']:.2f} |")
    return "\n".join(lines)


def full_markdown(result: dict) -> str:
    env = result["environment"]
    head = (f"convlstm_fast benchmark: {env['device_name']} ({env['device_descriptor']}, "
            f"{env['threads']} torch threads), torch "
            f"{env['torch']}, triton {env['triton']}, commit {env['git_commit']}, {env['date']}")
    parts = [head, table1_markdown(result["table1"]), latency_markdown(result),
             network_markdown(result), sweep_markdown(result),
             roofline_markdown(result["roofline"]) if result.get("roofline") else ""]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_json(result: dict, path: str) -> None:
    """Written atomically (a temporary file renamed over ``path``): a reader, or a kill midway,
    sees the previous complete file or the new one, never half of one."""
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, sort_keys=False)
    os.replace(path + ".tmp", path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_latency(result: dict, path: str) -> None:
    """Grouped bars: median latency per cell, one bar per backend (p20-p80 as error bars),
    forward and forward+backward side by side, one row of panels per shape."""
    plt = _pyplot()
    shapes = result["config"]["shapes"]
    variants = result["config"]["variants"]
    backends = _backends(result)
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 3.6 * len(shapes)), squeeze=False)
    width = 0.8 / max(1, len(backends))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    for row, shape in enumerate(shapes):
        for col, mode in enumerate((FORWARD, FORWARD_BACKWARD)):
            ax = axes[row][col]
            for k, backend in enumerate(backends):
                xs, ys, low, high = [], [], [], []
                for i, variant in enumerate(variants):
                    match = [r for r in result["latency"] if r["shape"]["label"] == shape["label"]
                             and r["variant"] == variant and r["backend"] == backend
                             and r["mode"] == mode]
                    if match:
                        r = match[0]
                        xs.append(i + (k - (len(backends) - 1) / 2) * width)
                        ys.append(r["median_ms"])
                        low.append(r["median_ms"] - r["p20_ms"])
                        high.append(r["p80_ms"] - r["median_ms"])
                if xs:
                    ax.bar(xs, ys, width, yerr=[low, high], label=backend, capsize=2,
                           color=colors[backend])
            ax.set_xticks(range(len(variants)), variants)
            ax.set_yscale("log")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{mode}, {shape['label']}: B={shape['batch']} T={shape['steps']} "
                         f"C={shape['hidden_channels']} {shape['height']}x{shape['width']}",
                         fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"ConvLSTM layer latency, {result['environment']['device_name']}, "
                 f"{result['config']['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(result: dict, path: str) -> None:
    """Forward latency against spatial size and against channels, a line per (cell, backend)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines = defaultdict(list)
    for r in result.get("sweep", []):
        s = r["shape"]
        x = s["height"] if s["label"] == "spatial" else s["hidden_channels"]
        lines[(s["label"], r["variant"], r["backend"])].append((x, r["median_ms"]))
    styles = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
    for ax, label, xlabel in ((axes[0], "spatial", "H = W"), (axes[1], "channels", "Cin = C")):
        ticks = set()
        for (kind, variant, backend), points in sorted(lines.items()):
            if kind != label:
                continue
            points.sort()
            ticks.update(p[0] for p in points)
            # Colour = cell, line style and marker = backend.
            color = f"C{result['config']['variants'].index(variant)}"
            style = styles[result["config"]["backends"].index(backend) % len(styles)]
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color,
                    linestyle=style[0], marker=style[1], label=f"{variant} / {backend}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forward ms (median)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    base = result["config"]["shapes"][0]
    fig.suptitle(f"Forward latency sweep (B={base['batch']} T={base['steps']}), "
                 f"{result['environment']['device_name']}, {result['config']['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out_dir: str, stem: str, plots: bool = True) -> dict[str, str]:
    """``<stem>.json``, ``<stem>.md``, and unless ``plots`` is False ``<stem>-latency.png`` and
    (with a sweep) ``<stem>-sweep.png`` in ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"),
             "markdown": os.path.join(out_dir, stem + ".md")}
    write_json(result, paths["json"])
    with open(paths["markdown"] + ".tmp", "w") as f:
        f.write(full_markdown(result))
    os.replace(paths["markdown"] + ".tmp", paths["markdown"])
    if not plots:
        return paths
    try:
        _pyplot()
    except ImportError as error:
        print(f"no PNG plots: matplotlib is not installed ({error})", file=sys.stderr)
        return paths
    if result["latency"]:
        paths["latency_png"] = os.path.join(out_dir, stem + "-latency.png")
        plot_latency(result, paths["latency_png"])
    if result.get("sweep"):
        paths["sweep_png"] = os.path.join(out_dir, stem + "-sweep.png")
        plot_sweep(result, paths["sweep_png"])
    return paths
