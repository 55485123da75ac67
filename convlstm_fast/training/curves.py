"""Training curves from ``metrics.json`` files:
``python -m convlstm_fast.training.curves RUN_DIR [RUN_DIR ...] --out curves.png``.

Left: training loss per epoch; right: validation top-1 per epoch (chance level dashed). Each run
is labelled with its variant, final top-1 and training wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_metrics(run) -> dict:
    path = Path(run)
    return json.loads((path / "metrics.json" if path.is_dir() else path).read_text())


def plot_curves(runs: dict[str, dict], path, title: str = "") -> None:
    """``runs`` maps a label to a metrics dict; writes a two-panel PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    chance = None
    for label, metrics in runs.items():
        epochs = [e["epoch"] for e in metrics["epochs"]]
        wall = sum(e["wall_s"] for e in metrics["epochs"])
        final = metrics["epochs"][-1]["val_top1"] if metrics["epochs"] else float("nan")
        name = f"{label}: {100 * final:.1f}% top-1, {wall / 60:.1f} min train"
        loss_ax.plot(epochs, [e["train_loss"] for e in metrics["epochs"]], marker="o", label=name)
        top1_ax.plot(epochs, [100 * e["val_top1"] for e in metrics["epochs"]], marker="o",
                     label=name)
        chance = 100.0 / metrics["num_classes"]
    loss_ax.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log")
    top1_ax.set(xlabel="epoch", ylabel="validation top-1 (%)", ylim=(0, 100))
    if chance is not None:
        top1_ax.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.0f}%)")
    for ax in (loss_ax, top1_ax):
        ax.grid(alpha=0.3)
    top1_ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m convlstm_fast.training.curves", description=__doc__)
    p.add_argument("runs", nargs="+", help="training output folders (or metrics.json files)")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    runs = {}
    for run in args.runs:
        metrics = load_metrics(run)
        runs[f"variant {metrics['config']['variant']}"] = metrics
    plot_curves(runs, args.out, args.title)
    print(f"curves: {args.out}")


if __name__ == "__main__":
    main()
