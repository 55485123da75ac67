"""Jester and IsoGD loaders with the reference preprocessing (shared/SPEC.md, "Frames").

Every clip goes through the same three steps:

1. :func:`sample_frame_indices` — n frames available, L wanted, div = n / L. If n < L: all frames,
   then the last one repeated. Otherwise frame k is floor(div·k), plus in training (when
   floor(div) >= 2) a uniform integer offset in [−floor(div)/4, +floor(div)/4], drawn per frame;
   indices are clamped to [0, n − 1].
2. :func:`crop_resize` — square crop of side min(h, w): random offset along the long side (one
   draw per clip) in training, centred in test; bilinear resize to ``size`` (112).
3. subtract the dataset mean (IsoGD RGB 112, depth 127; Jester RGB (114, 109, 104)); no std
   scaling, no flips.

Clips come out as ``[3, T, size, size]`` float32, labels as ints from 0. Random choices are drawn
from a generator seeded by ``(seed, epoch, index)`` (call ``set_epoch`` each epoch), so
augmentation does not depend on worker processes or on where a run was resumed.

Bad data is never turned into a wrong label: an unknown class name or malformed list line raises
:class:`DataError` naming the file and line; a missing video/frame folder raises naming the path,
or with ``on_missing="skip"`` is left out with a warning and counted in ``dataset.skipped``
(``check_files=True`` also opens every file up front, so corrupt ones are caught then); a file
that fails to decode while loading raises :class:`DataError` naming it.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

JESTER_MEAN = (114.0, 109.0, 104.0)
ISOGD_RGB_MEAN = (112.0, 112.0, 112.0)
ISOGD_DEPTH_MEAN = (127.0, 127.0, 127.0)
ISOGD_NUM_CLASSES = 249
MISSING_POLICIES = ("error", "skip")


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or malformed; the message names the file."""


def sample_frame_indices(num_frames: int, wanted: int, training: bool,
                         generator: torch.Generator | None = None) -> list[int]:
    """Indices of the ``wanted`` frames taken from a video of ``num_frames`` (SPEC "Frames")."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if wanted < 1:
        raise ValueError(f"wanted must be >= 1, got {wanted}")
    if num_frames < wanted:
        return list(range(num_frames)) + [num_frames - 1] * (wanted - num_frames)
    div = num_frames / wanted
    jitter = math.floor(div) // 4 if training and math.floor(div) >= 2 else 0
    indices = []
    for k in range(wanted):
        index = math.floor(div * k)
        if jitter:
            index += int(torch.randint(-jitter, jitter + 1, (1,), generator=generator))
        indices.append(min(max(index, 0), num_frames - 1))
    return indices


def crop_resize(frames: torch.Tensor, size: int, training: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Square crop of side min(h, w) and bilinear resize: ``[T, H, W, 3]`` uint8 ->
    ``[T, 3, size, size]`` float32 in [0, 255]. The crop offset along the long side is random
    (one draw per clip) in training and centred in test."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    height, width = frames.shape[1], frames.shape[2]
    side = min(height, width)
    slack = max(height, width) - side
    if training and slack > 0:
        offset = int(torch.randint(0, slack + 1, (1,), generator=generator))
    else:
        offset = slack // 2
    if height >= width:
        crop = frames[:, offset:offset + side, :, :]
    else:
        crop = frames[:, :, offset:offset + side, :]
    crop = crop.permute(0, 3, 1, 2).to(torch.float32)
    if side != size:
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=False)
    return crop


def preprocess(frames: torch.Tensor, wanted: int, size: int, mean, training: bool,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Frame sampling, crop, resize, mean subtraction: ``[n, H, W, 3]`` uint8 ->
    ``[3, wanted, size, size]`` float32."""
    indices = sample_frame_indices(frames.shape[0], wanted, training, generator)
    clip = crop_resize(frames[indices], size, training, generator)
    clip = clip - torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    return clip.permute(1, 0, 2, 3).contiguous()


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """Decode every frame of a video with PyAV: ``[n, H, W, 3]`` uint8 RGB."""
    import av

    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.FFmpegError, OSError, ValueError, IndexError) as error:
        raise DataError(f"cannot decode video {path}: {error}") from error
    if not frames:
        raise DataError(f"video {path} has no decodable frames")
    return torch.stack([torch.from_numpy(f) for f in frames])


def read_frame_folder(folder: str | os.PathLike) -> torch.Tensor:
    """Load a folder of JPEG frames (sorted by name) with Pillow: ``[n, H, W, 3]`` uint8 RGB."""
    import numpy as np
    from PIL import Image

    files = _frame_files(folder)
    if not files:
        raise DataError(f"frame folder {folder} holds no .jpg files")
    frames = []
    for file in files:
        try:
            with Image.open(file) as image:
                frames.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()))
        except (OSError, ValueError) as error:
            raise DataError(f"cannot decode image {file}: {error}") from error
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) != 1:
        raise DataError(f"frames in {folder} differ in size: {sorted(shapes)}")
    return torch.stack(frames)


def _frame_files(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))


def _check_image(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError) as error:
        raise DataError(f"cannot decode image {path}: {error}") from error


def _check_video(path: Path) -> None:
    import av

    try:
        with av.open(str(path)) as container:
            next(container.decode(video=0))
    except (av.FFmpegError, OSError, ValueError, IndexError, StopIteration) as error:
        raise DataError(f"cannot decode video {path}: {error!r}") from error


class ClipDataset(Dataset):
    """Shared machinery: a list of ``(source, label)`` samples, loading + preprocessing."""

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __init__(self, frames: int, size: int, training: bool, seed: int, on_missing: str):
        if on_missing not in MISSING_POLICIES:
            raise ValueError(f"on_missing must be one of {MISSING_POLICIES}, got {on_missing!r}")
        self.frames = frames
        self.size = size
        self.training = training
        self.seed = seed
        self.epoch = 0
        self.on_missing = on_missing
        self.samples: list[tuple[Path, int]] = []
        self.skipped: list[tuple[str, str]] = []

    def set_epoch(self, epoch: int) -> None:
        """Random crops and frame offsets differ per epoch; call before each epoch."""
        self.epoch = epoch

    def _problem(self, source: str, reason: str) -> None:
        if self.on_missing == "error":
            raise DataError(f"{reason} (pass on_missing='skip' to leave such samples out)")
        warnings.warn(f"skipping {source}: {reason}", stacklevel=3)
        self.skipped.append((source, reason))

    def __len__(self) -> int:
        return len(self.samples)

    def load_frames(self, source: Path) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int):
        source, label = self.samples[index]
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        clip = preprocess(self.load_frames(source), self.frames, self.size, self.mean,
                          self.training, generator)
        return clip, label

    def frame_images(self, index: int) -> torch.Tensor:
        """The preprocessed clip as displayable frames ``[T, S, S, 3]`` uint8 (for figures)."""
        clip, _ = self[index]
        clip = clip + torch.tensor(self.mean)[:, None, None, None]
        return clip.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)


def read_jester_labels(labels_csv: str | os.PathLike) -> list[str]:
    """Class names, one per line, in label order (``jester-v1-labels.csv``)."""
    with open(labels_csv, newline="") as handle:
        names = [line.strip() for line in handle if line.strip()]
    if len(set(names)) != len(names):
        raise DataError(f"labels file {labels_csv} repeats a class name")
    return names


class JesterDataset(ClipDataset):
    """20BN-Jester: one folder of JPEG frames per video id under ``root``; ``split_csv`` lines
    ``id;label`` with the label a class name from ``labels_csv`` (as distributed).

    Args:
        root: folder holding one sub-folder of frames per video id.
        split_csv: e.g. ``jester-v1-train.csv``.
        labels_csv: e.g. ``jester-v1-labels.csv`` (27 class names).
        frames: clip length L (16 in the paper for Jester).
        size: output frame side (112).
        training: random frame offsets and crops when True; deterministic otherwise.
        seed: seed of the augmentation draws.
        on_missing: ``"error"`` or ``"skip"`` for a missing/empty (or, with ``check_files``,
            corrupt) video folder.
        check_files: open every JPEG header now (slow on the full dataset).
    """

    mean = JESTER_MEAN

    def __init__(self, root, split_csv, labels_csv, frames: int = 16, size: int = 112,
                 training: bool = False, seed: int = 0, on_missing: str = "error",
                 check_files: bool = False):
        super().__init__(frames, size, training, seed, on_missing)
        self.root = Path(root)
        self.classes = read_jester_labels(labels_csv)
        self.num_classes = len(self.classes)
        index = {name: i for i, name in enumerate(self.classes)}
        with open(split_csv, newline="") as handle:
            for line_number, row in enumerate(csv.reader(handle, delimiter=";"), start=1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) != 2:
                    raise DataError(f"{split_csv}:{line_number}: expected 'id;label', got {row!r}")
                video_id, name = row[0].strip(), row[1].strip()
                if name not in index:
                    raise DataError(f"{split_csv}:{line_number}: unknown class {name!r} "
                                    f"(not in {labels_csv})")
                folder = self.root / video_id
                files = _frame_files(folder)
                if not folder.is_dir():
                    self._problem(str(folder), f"video folder {folder} is missing")
                    continue
                if not files:
                    self._problem(str(folder), f"video folder {folder} holds no .jpg frames")
                    continue
                if check_files:
                    try:
                        for file in files:
                            _check_image(file)
                    except DataError as error:
                        self._problem(str(folder), str(error))
                        continue
                self.samples.append((folder, index[name]))

    def load_frames(self, source: Path) -> torch.Tensor:
        return read_frame_folder(source)


class IsoGDDataset(ClipDataset):
    """ChaLearn IsoGD: RGB and depth videos under ``root``; ``list_file`` lines
    ``train/001/M_00001.avi train/001/K_00001.avi 26`` (RGB path, depth path, label from 1).

    Args:
        root: folder the list's paths are relative to.
        list_file: e.g. ``train_list.txt``.
        modality: ``"rgb"`` (mean 112) or ``"depth"`` (mean 127; depth videos are decoded as RGB).
        frames: clip length L (32 in the paper for IsoGD).
        num_classes: labels must lie in [1, num_classes] in the file (249).
        size, training, seed, on_missing, check_files: as for :class:`JesterDataset`.
    """

    def __init__(self, root, list_file, modality: str = "rgb", frames: int = 32, size: int = 112,
                 training: bool = False, seed: int = 0, on_missing: str = "error",
                 check_files: bool = False, num_classes: int = ISOGD_NUM_CLASSES):
        super().__init__(frames, size, training, seed, on_missing)
        if modality not in ("rgb", "depth"):
            raise ValueError(f"modality must be 'rgb' or 'depth', got {modality!r}")
        self.root = Path(root)
        self.modality = modality
        self.mean = ISOGD_RGB_MEAN if modality == "rgb" else ISOGD_DEPTH_MEAN
        self.num_classes = num_classes
        self.classes = [str(i) for i in range(1, num_classes + 1)]
        with open(list_file) as handle:
            for line_number, line in enumerate(handle, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 3:
                    raise DataError(f"{list_file}:{line_number}: expected 'RGB_PATH DEPTH_PATH "
                                    f"LABEL', got {line.strip()!r}")
                try:
                    label = int(fields[2])
                except ValueError:
                    raise DataError(f"{list_file}:{line_number}: label {fields[2]!r} is not an "
                                    "integer") from None
                if not 1 <= label <= num_classes:
                    raise DataError(f"{list_file}:{line_number}: label {label} outside "
                                    f"[1, {num_classes}]")
                path = self.root / fields[0 if modality == "rgb" else 1]
                if not path.is_file():
                    self._problem(str(path), f"video {path} is missing")
                    continue
                if check_files:
                    try:
                        _check_video(path)
                    except DataError as error:
                        self._problem(str(path), str(error))
                        continue
                self.samples.append((path, label - 1))

    def load_frames(self, source: Path) -> torch.Tensor:
        return read_video(source)
