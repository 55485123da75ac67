"""``python -m convlstm_fast.bench`` / ``convlstm-bench``: Table 1, cell latency on every usable
backend, saved-for-backward bytes, the full network's cost and throughput, and a size sweep.

Without arguments it runs a default sized for a 2-core CPU (a few minutes). ``--table1`` prints
only Table 1 (fast: counted on fake tensors), ``--roofline`` only the modelled HBM bytes, FLOPs
and launches of the fused GPU ops (bench/roofline.py: no GPU needed; every full run reports them
too). ``--quick`` is a seconds-long smoke run.
``--paper`` uses the paper's shapes (256 channels, 28x28; T=16 B=8 and T=8 B=16), for a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from ..registry import IMPORT_HELP, cell_names, check_variant, import_cell_modules
from . import cases, roofline
from .harness import device_descriptor
from .report import full_markdown, table1_markdown, write_json, write_outputs
from .suite import default_config, run_suite

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _shape(text: str) -> cases.CellShape:
    """``B,T,C,H,W`` (Cin = C) or ``B,T,Cin,C,H,W``, optionally ``,K`` appended as a 6th/7th."""
    try:
        values = [int(v) for v in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be integers B,T,C,H,W, got {text!r}")
    if len(values) == 5:
        b, t, c, h, w = values
        return cases.CellShape(b, t, c, c, h, w, label="custom")
    if len(values) in (6, 7):
        return cases.CellShape(*values[:6], *(values[6:] or [3]), label="custom")
    raise argparse.ArgumentTypeError(f"--shape takes B,T,C,H,W or B,T,Cin,C,H,W[,K], got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convlstm-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                        help=IMPORT_HELP)
    parser.add_argument("--variants", type=_list,
                        help=f"comma list of registered cells ({','.join(cell_names())})")
    parser.add_argument("--backends", type=_list,
                        help="comma list of registered backends and 'compile' (default: all)")
    parser.add_argument("--shape", type=_shape, action="append",
                        help="cell shape B,T,C,H,W or B,T,Cin,C,H,W[,K]; repeatable")
    parser.add_argument("--paper", action="store_true",
                        help="paper shapes: 256 channels, 28x28, T=16 B=8 (IsoGD) and T=8 B=16 (Jester)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (seconds)")
    parser.add_argument("--table1", action="store_true", help="print only Table 1 and exit")
    parser.add_argument("--roofline", action="store_true",
                        help="print only the modelled roofline of the fused GPU ops (HBM bytes, "
                             "FLOPs, launches per step, ratio to the floor; at the paper's layer "
                             "in bfloat16 unless --shape/--dtype) and exit; with --out also "
                             "<stem>-roofline.json")
    parser.add_argument("--out", help="folder for the JSON, markdown and PNG plots (the JSON is "
                                      "rewritten after every case, so a killed run keeps its cases)")
    parser.add_argument("--stem", help="file name stem of the outputs (default: "
                                       "<device>-<date>[-<preset>])")
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots")
    parser.add_argument("--repeats", type=int, help="timed repetitions per case")
    parser.add_argument("--time-budget", type=float,
                        help="seconds after which no new case starts (results so far are kept)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--no-network", action="store_true", help="skip the full-network cases")
    parser.add_argument("--no-sweep", action="store_true", help="skip the size sweep")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--recompute", help="also time every backend with "
                        "convlstm_layer(recompute=...) in forward+backward: steps, layers or N")
    parser.add_argument("--sequence-options", action="store_true",
                        help="also time every backend with reverse=True (a bidirectional "
                             "layer's second direction), with ragged lengths drawn in [T/2, T] "
                             "and driven one step per call (as a ConvLSTMCell)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import_cell_modules(argv)
    args = build_parser().parse_args(argv)
    if args.table1:
        print(table1_markdown(cases.table1()))
        return 0
    if args.roofline:
        shape = args.shape[0] if args.shape else cases.PAPER_SHAPES[0]
        itemsize = torch.empty((), dtype=DTYPES[args.dtype or "bfloat16"]).element_size()
        entry = roofline.roofline_result(shape, itemsize)
        print(roofline.roofline_markdown(entry))
        if args.out:
            path = f"{args.out}/{args.stem or 'roofline'}-roofline.json"
            write_json(entry, path)
            print(f"wrote json: {path}")
        return 0
    if args.paper and args.quick:
        print("--paper and --quick exclude each other", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    config = default_config(args.device, DTYPES.get(args.dtype), quick=args.quick,
                            paper=args.paper)
    if args.variants:
        for variant in args.variants:
            check_variant(variant)
        config.variants = args.variants
    if args.backends:
        config.backends = cases.backend_names(args.backends)
    if args.shape:
        config.shapes = tuple(args.shape)
    if args.repeats:
        config.repeats = args.repeats
    if args.time_budget:
        config.time_budget_s = args.time_budget
    if args.recompute:
        config.recompute = int(args.recompute) if args.recompute.isdigit() else args.recompute
    if args.sequence_options:
        config.sequence_options = True
    if args.no_network:
        config.network = None
    if args.no_sweep:
        config.sweep_spatial = config.sweep_channels = ()
    stem = args.stem or f"{device_descriptor(config.device)}-{datetime.date.today().isoformat()}" \
        + ("" if config.label == "default" else f"-{config.label}")
    run_argv = sys.argv[1:] if argv is None else list(argv)

    def checkpoint(partial: dict) -> None:
        partial["environment"]["argv"] = run_argv
        write_outputs(partial, args.out, stem, plots=False)

    result = run_suite(config, progress=not args.no_progress,
                       on_task=checkpoint if args.out else None)
    result["environment"]["argv"] = run_argv
    print(full_markdown(result))
    if args.out:
        for kind, path in write_outputs(result, args.out, stem, plots=not args.no_plots).items():
            print(f"wrote {kind}: {path}")
    print(f"benchmark wall time {result['wall_seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
