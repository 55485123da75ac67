"""Fig. 3 of the paper: ``python -m convlstm_fast.visualize CHECKPOINT --clip 0 --out fig.png``.

Row 1 shows the input frames. Row 2: for each ConvLSTM step t, the channel c* of the LAST ConvLSTM
layer with the largest sum over h, w of H_t[c], its map H_t[c*] drawn as a heat map over the input
frame (step t covers frames 2t and 2t + 1: Res3D halves T; the map is upsampled from S/4 to S).
Row 3, for the attention cells b, c, d: the attention maps of the FIRST ConvLSTM layer (the cell
under test), read from the reference implementation: the layer's input (Res3D output,
``GestureNet.forward_stages(x)["res3d"]``) and parameters go through
``convlstm_fast.reference.cells.layer(variant, x, h0, c0, params, gate_activation, records=records)``,
which appends one dict per step holding ``records[t]["attention"]`` — the softmax map A
``[B, 1, H, W]`` for b, the channel-wise map exp(Z − max Z) ``[B, C, H, W]`` for c (input gate)
and d (output gate), shown averaged over channels — and ``records[t]["gates"]``, the pooled gates.

``--clip`` is an index into the checkpoint's validation set, or a path to a video file (PyAV) or
a folder of JPEG frames, preprocessed as in test (centred crop, uniform frame sampling).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backends import BACKEND_CHOICES
from ..reference import cells
from ..registry import IMPORT_HELP, get_cell, import_cell_modules
from .evaluate import load_for_inference


def load_clip(clip: str, config: dict, val_set):
    """``(input [3, T, S, S] float32 (mean subtracted), frames [T, S, S, 3] uint8, label or None)``."""
    if clip.lstrip("-").isdigit():
        index = int(clip)
        x, label = val_set[index]
        return x, val_set.frame_images(index), label
    from .datasets import preprocess, read_frame_folder, read_video

    path = Path(clip)
    raw = read_frame_folder(path) if path.is_dir() else read_video(path)
    mean = getattr(val_set, "mean", None)
    if mean is None or isinstance(mean, float):
        mean = (float(mean or 0.0),) * 3
    x = preprocess(raw, config["frames"], config["size"], mean, training=False)
    frames = (x + torch.tensor(mean)[:, None, None, None]).round().clamp(0, 255)
    return x, frames.to(torch.uint8).permute(1, 2, 3, 0), None


@torch.no_grad()
def figure_maps(model, x: torch.Tensor) -> dict:
    """The maps of Fig. 3 for one clip ``x [3, T, S, S]``.

    Returns ``hidden [T', C, H', W']`` (last ConvLSTM layer), ``channels`` (c* per step),
    ``heatmaps [T', S, S]`` (H_t[c*] upsampled, each scaled to [0, 1]), ``logits``, and for
    b/c/d ``attention [T', S, S]`` (first layer, upsampled, scaled to [0, 1]) and ``records``.
    """
    model.eval()
    stages = model.forward_stages(x[None])
    hidden = stages["convlstm2"][0]  # [T', C, H', W']
    size = x.shape[-1]
    channels = hidden.sum(dim=(-2, -1)).argmax(dim=1)  # c* = argmax_c sum_hw H_t[c]
    maps = hidden[torch.arange(hidden.shape[0]), channels]  # [T', H', W']
    result = {"hidden": hidden, "channels": channels, "logits": stages["head"][0],
              "heatmaps": _upsample_normalised(maps, size)}
    cell = model.convlstm1.cells[0]
    if "attention" in get_cell(cell.variant).records:
        sequence = stages["res3d"].transpose(0, 1)  # time-first [T', 1, C, H', W']
        zeros = sequence.new_zeros(1, cell.hidden_channels, *sequence.shape[-2:])
        params = dict(zip(get_cell(cell.variant).parameter_names, cell.parameter_list()))
        records: list[dict] = []
        cells.layer(cell.variant, sequence, zeros, zeros, params, cell.gate_activation,
                    records=records)
        attention = torch.stack([r["attention"][0].mean(dim=0) for r in records])
        result["attention"] = _upsample_normalised(attention, size)
        result["records"] = records
    return result


def _upsample_normalised(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, h, w]`` -> ``[N, size, size]``, bilinear, each map min-max scaled to [0, 1]."""
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear",
                       align_corners=False)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    high = up.amax(dim=(1, 2), keepdim=True)
    return (up - low) / (high - low).clamp(min=1e-12)


def draw_figure(frames: torch.Tensor, maps: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = maps["heatmaps"].shape[0]
    rows = 3 if "attention" in maps else 2
    fig, axes = plt.subplots(rows, steps, figsize=(1.6 * steps, 1.75 * rows + 0.4), squeeze=False)
    for t in range(steps):
        frame = frames[min(2 * t, frames.shape[0] - 1)].numpy()
        axes[0, t].imshow(frame)
        axes[0, t].set_title(f"frame {min(2 * t, frames.shape[0] - 1)}", fontsize=7)
        axes[1, t].imshow(frame)
        axes[1, t].imshow(maps["heatmaps"][t].numpy(), cmap="jet", alpha=0.5)
        axes[1, t].set_title(f"H_{t} ch {int(maps['channels'][t])}", fontsize=7)
        if rows == 3:
            axes[2, t].imshow(frame)
            axes[2, t].imshow(maps["attention"][t].numpy(), cmap="jet", alpha=0.5)
            axes[2, t].set_title(f"attention t={t}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m convlstm_fast.visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory or training output folder")
    p.add_argument("--clip", default="0",
                   help="index into the validation set, or a video file / JPEG frame folder")
    p.add_argument("--data", help="dataset folder, if it differs from the training run's")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="reference")
    p.add_argument("--out", default="fig3.png")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help=IMPORT_HELP)
    import_cell_modules(argv)
    args = p.parse_args(argv)

    model, config, meta, val_set = load_for_inference(args.checkpoint, args.backend, "cpu",
                                                      args.data)
    x, frames, label = load_clip(args.clip, config, val_set)
    maps = figure_maps(model, x)
    classes = meta["classes"]
    predicted = classes[int(maps["logits"].argmax())]
    truth = "" if label is None else f", true {classes[label]}"
    title = f"variant {config['variant']}: predicted {predicted}{truth}"
    draw_figure(frames, maps, args.out, title)
    print(f"{title}; figure: {args.out}")
    return maps


if __name__ == "__main__":
    main()
