"""Train GestureNet: ``python -m convlstm_fast.train`` (also ``convlstm-train``, and under
``torchrun --nproc_per_node N`` with DistributedDataParallel).

Recipe (shared/SPEC.md "The full network"): SGD, momentum 0.9; learning rate decayed per
iteration as lr(s) = (lr0 − lr_end)·(1 − s/S)^0.9 + lr_end from 1e-3 to 1e-6 over the S steps of
the run; weight decay 1e-4 on parameters with ndim >= 2 only; batch 8; mixed precision
(``torch.autocast``, bf16 by default) on GPU. ``--preset quick`` makes a small network on small
synthetic clips that trains on a 2-core CPU in minutes; it uses lr0 = 0.01 (the paper's 1e-3 is
for ~10^5 iterations, not ~10^3).

Every epoch ends with an evaluation and a checkpoint (``OUT/checkpoints``, see
:mod:`.checkpoint`); ``OUT/metrics.json`` holds the config, ``num_classes`` and per epoch
``train_loss``, ``train_top1``, ``val_loss``, ``val_top1``, ``wall_s``. ``--resume`` continues from
the newest checkpoint in OUT with no step lost or repeated: the data order, the augmentation draws
and the learning rate are functions of (seed, epoch, step), and the checkpoint holds the model,
the momentum buffers, the partial-epoch sums and the RNG states, so on CPU a resumed run is
bitwise equal to an uninterrupted one (``tests/test_training.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..registry import GATE_ACTIVATIONS, IMPORT_HELP, cell_names, import_cell_modules
from ..backends import BACKEND_CHOICES
from . import checkpoint as ckpt
from .distributed import (DistributedContext, ShardSampler, SkipSampler, all_reduce_sum, barrier,
                          init_distributed, shutdown_distributed, train_sampler, wrap_model)

DATASETS = ("synthetic", "jester", "isogd")

DEFAULTS = dict(
    dataset="synthetic", data=None, variant="a", second_variant=None, backend="auto",
    gate_activation="sigmoid", init="default", width_mult=1.0, frames=None, size=112,
    num_classes=10, train_clips=2000, val_clips=400, modality="rgb", epochs=10, batch_size=8,
    lr=1e-3, lr_end=1e-6, lr_power=0.9, momentum=0.9, weight_decay=1e-4, seed=0, workers=2,
    amp="auto", sync_bn=False, checkpoint_every=0, keep_checkpoints=2, threads=None,
)
# Frames per clip when not given: Jester 16, IsoGD 32 (SPEC), synthetic 16.
DEFAULT_FRAMES = {"synthetic": 16, "jester": 16, "isogd": 32}

PRESETS = {
    # Small enough for a 2-core CPU: channels / 8 (32 in the ConvLSTM layers), 8 frames of 32².
    "quick": dict(width_mult=0.125, frames=8, size=32, num_classes=10, train_clips=960,
                  val_clips=200, epochs=12, batch_size=8, lr=0.01, workers=0, threads=1),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convlstm_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data", help="dataset folder (jester: frame folders + jester-v1-*.csv; "
                   "isogd: videos + train_list.txt, valid_list.txt)")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE", help=IMPORT_HELP)
    p.add_argument("--variant", choices=cell_names(), help="first ConvLSTM layer's cell")
    p.add_argument("--second-variant", choices=cell_names())
    p.add_argument("--backend", choices=BACKEND_CHOICES)
    p.add_argument("--gate-activation", choices=GATE_ACTIVATIONS)
    p.add_argument("--init", choices=("default", "reference"))
    p.add_argument("--width-mult", type=float)
    p.add_argument("--frames", type=int, help="frames per clip (default 16; IsoGD 32)")
    p.add_argument("--size", type=int, help="frame side, divisible by 16 (default 112)")
    p.add_argument("--num-classes", type=int, help="synthetic dataset only")
    p.add_argument("--train-clips", type=int, help="synthetic dataset only")
    p.add_argument("--val-clips", type=int, help="synthetic dataset only")
    p.add_argument("--modality", choices=("rgb", "depth"), help="isogd only")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float, help="initial learning rate (1e-3)")
    p.add_argument("--lr-end", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"),
                   help="autocast dtype on GPU (auto = bf16); CPU runs in fp32")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="SyncBatchNorm across processes (GPU DDP)")
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
    p.add_argument("--preset", choices=tuple(PRESETS))
    p.add_argument("--out", required=True, help="output folder (metrics.json, checkpoints/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (quick preset: 1)")
    p.add_argument("--max-steps", type=int,
                   help="stop (with a checkpoint) after this global step, as if interrupted")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Defaults, then the preset, then the flags given explicitly."""
    config = dict(DEFAULTS)
    if args.preset:
        config.update(PRESETS[args.preset])
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    if config["frames"] is None:
        config["frames"] = DEFAULT_FRAMES[config["dataset"]]
    if config["size"] % 16:
        raise ValueError(f"--size must be divisible by 16, got {config['size']}")
    if config["dataset"] != "synthetic" and not config["data"]:
        raise ValueError(f"--dataset {config['dataset']} needs --data DIR")
    config["preset"] = args.preset
    return config


# Flags that may change when a run is resumed; the rest of the config comes from the checkpoint.
RESUME_OVERRIDES = ("epochs", "workers", "backend", "checkpoint_every", "keep_checkpoints",
                    "threads")


def explicit_overrides(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in RESUME_OVERRIDES
            if getattr(args, key, None) is not None}


# -- data and model from a config (shared with evaluate and visualize) ---------------------------
def build_datasets(config: dict, with_train: bool = True):
    """``(train, val)`` datasets of the config; both expose ``num_classes`` and ``classes``.
    ``with_train=False`` returns ``(None, val)`` without scanning the training split."""
    from .datasets import IsoGDDataset, JesterDataset
    from .synthetic import SyntheticGestures

    frames, size, seed = config["frames"], config["size"], config["seed"]
    if config["dataset"] == "synthetic":
        common = dict(num_classes=config["num_classes"], frames=frames, size=size)
        return (SyntheticGestures(config["train_clips"], seed=2 * seed, **common)
                if with_train else None,
                SyntheticGestures(config["val_clips"], seed=2 * seed + 1, **common))
    data = Path(config["data"])
    if config["dataset"] == "jester":
        root = data / "20bn-jester-v1" if (data / "20bn-jester-v1").is_dir() else data
        labels = data / "jester-v1-labels.csv"
        common = dict(frames=frames, size=size, seed=seed)
        return (JesterDataset(root, data / "jester-v1-train.csv", labels, training=True, **common)
                if with_train else None,
                JesterDataset(root, data / "jester-v1-validation.csv", labels, **common))
    common = dict(modality=config["modality"], frames=frames, size=size, seed=seed)
    return (IsoGDDataset(data, data / "train_list.txt", training=True, **common)
            if with_train else None,
            IsoGDDataset(data, data / "valid_list.txt", **common))


def build_model(config: dict, num_classes: int, backend: str | None = None):
    from ..models import GestureNet

    return GestureNet(num_classes, variant=config["variant"],
                      second_variant=config["second_variant"],
                      backend=backend or config["backend"], init=config["init"],
                      width_mult=config["width_mult"], gate_activation=config["gate_activation"])


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on parameters with ndim >= 2 (kernels) only; biases and BN get none."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def poly_lr(step: int, total_steps: int, lr: float, lr_end: float, power: float) -> float:
    """Polynomial decay (TF ``polynomial_decay``): (lr − lr_end)·(1 − s/S)^power + lr_end."""
    progress = min(step, total_steps) / max(total_steps, 1)
    return (lr - lr_end) * (1.0 - progress) ** power + lr_end


def amp_dtype(config: dict, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or config["amp"] == "none":
        return None
    return torch.float16 if config["amp"] == "fp16" else torch.bfloat16


def forward_loss(model, clips, labels, dtype: torch.dtype | None):
    """Logits and mean cross-entropy, under autocast when ``dtype`` is given."""
    with torch.autocast(clips.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(clips)
    return logits, F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def evaluate_model(model, loader, device, dtype=None, num_classes=None, progress=False):
    """Top-1 and mean loss over ``loader`` (summed over processes); with ``num_classes`` also a
    confusion matrix ``[true, predicted]``."""
    from tqdm import tqdm

    model.eval()
    correct = total = loss_sum = 0.0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64) if num_classes else None
    for clips, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        clips, labels = clips.to(device), labels.to(device)
        logits, loss = forward_loss(model, clips, labels, dtype)
        predicted = logits.argmax(dim=1)
        correct += (predicted == labels).sum().item()
        total += labels.numel()
        loss_sum += loss.item() * labels.numel()
        if confusion is not None:
            index = labels.cpu() * num_classes + predicted.cpu()
            confusion += torch.bincount(index, minlength=num_classes ** 2).view_as(confusion)
    correct, total, loss_sum = all_reduce_sum([correct, total, loss_sum], device)
    result = {"top1": correct / max(total, 1), "loss": loss_sum / max(total, 1), "count": total}
    if confusion is not None:
        if torch.distributed.is_initialized():
            confusion = confusion.to(device)
            torch.distributed.all_reduce(confusion)
        result["confusion"] = confusion.cpu()
    return result


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)


def _device(name: str | None, context: DistributedContext) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and context.enabled:
        return torch.device("cuda", context.local_rank)
    return torch.device(name)


def _cell_backends(model, device: torch.device) -> dict[str, str]:
    """Which backend runs each ConvLSTM layer (what ``"auto"`` resolved to), for the record."""
    from ..backends import select_backend

    probe = torch.zeros(1, device=device)
    return {name: select_backend(layer.cells[0].backend, layer.cells[0].variant, probe).name
            for name, layer in (("convlstm1", model.convlstm1), ("convlstm2", model.convlstm2))}


def train(config: dict, out: Path, resume: bool = False, device_name: str | None = None,
          max_steps: int | None = None, progress: bool = True,
          overrides: dict | None = None) -> dict:
    """Run (or continue) training as ``config`` says; returns the metrics dict. When resuming,
    the checkpoint's config is used, updated with ``overrides`` (see :data:`RESUME_OVERRIDES`;
    a different ``epochs`` changes the learning-rate schedule from there on)."""
    device_type = (device_name or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    context = init_distributed(device_type)
    device = _device(device_name, context)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = out / "checkpoints"
    latest = ckpt.latest_checkpoint(checkpoint_dir) if resume else None
    if latest is not None:
        saved = ckpt.read_meta(latest)["config"]
        config = dict(saved, **(overrides or {}))

    threads = torch.get_num_threads()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    try:
        return _train(config, out, context, device, checkpoint_dir, latest, max_steps, progress)
    finally:
        torch.set_num_threads(threads)
        shutdown_distributed()


def _train(config, out, context, device, checkpoint_dir, latest, max_steps, progress) -> dict:
    from tqdm import tqdm

    torch.manual_seed(config["seed"])
    train_set, val_set = build_datasets(config)
    model = build_model(config, train_set.num_classes).to(device)
    if config["sync_bn"] and context.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before the optimiser
    optimizer = torch.optim.SGD(parameter_groups(model, config["weight_decay"]), lr=config["lr"],
                                momentum=config["momentum"])
    dtype = amp_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    sampler = SkipSampler(train_sampler(train_set, context, config["seed"]))
    loader_args = dict(batch_size=config["batch_size"], num_workers=config["workers"],
                       pin_memory=device.type == "cuda", persistent_workers=False)
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **loader_args)
    val_loader = DataLoader(val_set, sampler=ShardSampler(len(val_set), context), **loader_args)
    steps_per_epoch = len(sampler.sampler) // config["batch_size"]
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training clips over {context.world_size} processes "
                         f"give no full batch of {config['batch_size']}")
    total_steps = steps_per_epoch * config["epochs"]

    metrics = {"config": config, "num_classes": train_set.num_classes,
               "classes": list(train_set.classes), "world_size": context.world_size,
               "device": str(device), "cell_backends": _cell_backends(model, device),
               "epochs": []}
    epoch, step, batch_in_epoch = 0, 0, 0
    running = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "wall_s": 0.0}
    if latest is not None:
        meta = ckpt.load_checkpoint(latest, model, optimizer, scaler)
        epoch, step, batch_in_epoch = meta["epoch"], meta["step"], meta["batch_in_epoch"]
        running, metrics["epochs"] = meta["running"], meta["metrics"]
        if not context.is_main:  # rank 0 carries the summed partial-epoch statistics
            running.update(loss_sum=0.0, correct=0.0, count=0.0)
        if context.is_main:
            print(f"resumed from {latest} (epoch {epoch + 1}, step {step})", flush=True)
    net = wrap_model(model, context, device)

    def save(epoch_index: int, batch_index: int) -> None:
        # The partial-epoch sums of all processes, summed (a collective: every rank calls save).
        keys = ("loss_sum", "correct", "count")
        totals = dict(zip(keys, all_reduce_sum([running[k] for k in keys], device)))
        if context.is_main:
            meta = {"epoch": epoch_index, "step": step, "batch_in_epoch": batch_index,
                    "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                    "config": config, "num_classes": train_set.num_classes,
                    "classes": list(train_set.classes), "running": dict(running, **totals),
                    "metrics": metrics["epochs"]}
            ckpt.save_checkpoint(checkpoint_dir, model, optimizer, meta, scaler,
                                 keep=config["keep_checkpoints"])
        barrier()

    stopped = False
    while epoch < config["epochs"] and not stopped:
        for dataset in (train_set, val_set):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, skip=batch_in_epoch * config["batch_size"])
        net.train()
        started = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config['epochs']}",
                   initial=batch_in_epoch, total=steps_per_epoch,
                   disable=not (progress and context.is_main), dynamic_ncols=True)
        for clips, labels in bar:
            clips, labels = clips.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            lr = poly_lr(step, total_steps, config["lr"], config["lr_end"], config["lr_power"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits, loss = forward_loss(net, clips, labels, dtype)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            batch_in_epoch += 1
            running["loss_sum"] += loss.item() * labels.numel()
            running["correct"] += (logits.argmax(1) == labels).sum().item()
            running["count"] += labels.numel()
            bar.set_postfix(loss=f"{running['loss_sum'] / running['count']:.3f}",
                            acc=f"{running['correct'] / running['count']:.3f}", lr=f"{lr:.2e}")
            if max_steps is not None and step >= max_steps:
                stopped = True
            elif (config["checkpoint_every"] and step % config["checkpoint_every"] == 0
                  and batch_in_epoch < steps_per_epoch):  # the epoch's end saves anyway
                running["wall_s"] += time.perf_counter() - started
                started = time.perf_counter()
                save(epoch, batch_in_epoch)
            if stopped:
                break
        bar.close()
        running["wall_s"] += time.perf_counter() - started
        if stopped and batch_in_epoch < steps_per_epoch:
            save(epoch, batch_in_epoch)
            break
        loss_sum, correct, count = all_reduce_sum(
            [running["loss_sum"], running["correct"], running["count"]], device)
        val = evaluate_model(net, val_loader, device, dtype, progress=progress and context.is_main)
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / count,
                  "train_top1": correct / count, "val_loss": val["loss"], "val_top1": val["top1"],
                  "lr": optimizer.param_groups[0]["lr"], "wall_s": running["wall_s"]}
        metrics["epochs"].append(record)
        if context.is_main:
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} top-1 "
                  f"{record['train_top1']:.3f} | val loss {val['loss']:.4f} top-1 "
                  f"{val['top1']:.3f} | {record['wall_s']:.1f} s", flush=True)
        epoch, batch_in_epoch = epoch + 1, 0
        running = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "wall_s": 0.0}
        save(epoch, 0)
        if context.is_main:
            _write_json(out / "metrics.json", metrics)
    if context.is_main and not (out / "metrics.json").exists():
        _write_json(out / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    import_cell_modules(argv)
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    return train(config, Path(args.out), resume=args.resume, device_name=args.device,
                 max_steps=args.max_steps, progress=not args.no_progress,
                 overrides=explicit_overrides(args))


if __name__ == "__main__":
    main()
