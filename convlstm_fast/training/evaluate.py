"""Evaluate a checkpoint: ``python -m convlstm_fast.evaluate CHECKPOINT [--out confusion.png]``.

``CHECKPOINT`` is a checkpoint directory or a training output folder (its newest checkpoint is
used). The model and the validation set are rebuilt from the config stored in the checkpoint;
``--data`` points at the dataset when it moved, ``--backend`` runs the cells on any backend (the
weights are backend-independent). Prints top-1, writes a confusion-matrix PNG and, with ``--json``,
the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..backends import BACKEND_CHOICES
from ..registry import IMPORT_HELP, import_cell_modules
from . import checkpoint as ckpt
from .train import amp_dtype, build_datasets, build_model, evaluate_model


def resolve_checkpoint(path) -> Path:
    found = ckpt.latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {path} (expected meta.json, or checkpoints/)")
    return found


def load_for_inference(path, backend: str | None = None, device: str = "cpu",
                       data: str | None = None):
    """``(model in eval mode, config, meta, validation dataset)`` from a checkpoint."""
    checkpoint = resolve_checkpoint(Path(path) / "checkpoints"
                                    if (Path(path) / "checkpoints").is_dir() else path)
    meta = ckpt.read_meta(checkpoint)
    config = dict(meta["config"])
    if data is not None:
        config["data"] = data
    model = build_model(config, meta["num_classes"], backend=backend)
    model.load_state_dict(ckpt.load_model_state(checkpoint))
    model.to(device).eval()
    _, val_set = build_datasets(config, with_train=False)
    return model, config, meta, val_set


def plot_confusion(confusion: torch.Tensor, classes: list[str], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.to(torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * n, 1.5 + 0.45 * n))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j] > 0:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m convlstm_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory or training output folder")
    p.add_argument("--data", help="dataset folder, if it differs from the training run's")
    p.add_argument("--backend", choices=BACKEND_CHOICES, help="default: the training run's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default="confusion.png", help="confusion-matrix PNG")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help=IMPORT_HELP)
    import_cell_modules(argv)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, config, meta, val_set = load_for_inference(args.checkpoint, args.backend, device,
                                                      args.data)
    loader = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers)
    result = evaluate_model(model, loader, device, amp_dtype(config, device),
                            num_classes=meta["num_classes"], progress=True)
    title = (f"{config['dataset']} val, variant {config['variant']}: top-1 "
             f"{100 * result['top1']:.2f}% ({int(result['count'])} clips)")
    print(title)
    plot_confusion(result["confusion"], meta["classes"], args.out, title)
    print(f"confusion matrix: {args.out}")
    summary = {"top1": result["top1"], "loss": result["loss"], "count": result["count"],
               "confusion": result["confusion"].tolist(), "classes": meta["classes"],
               "variant": config["variant"], "step": meta["step"]}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
