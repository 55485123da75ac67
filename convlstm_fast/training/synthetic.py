"""An embedded synthetic gesture dataset: procedural clips, no download.

Each clip shows a hand-like shape (an elliptic palm with four fingers and a thumb, so rotation is
visible) doing one motion over a cluttered background: static random ellipses and rectangles, one
slowly drifting distractor blob, and per-frame pixel noise. Everything is drawn from a generator
seeded by ``(seed, index)``, so a clip is the same on every run, in every worker process and on
every machine. Labels are balanced: clip ``i`` has label ``i % num_classes``.

Clips come out in the layout of the real datasets (:mod:`.datasets`): ``[3, T, S, S]`` float32,
pixel values in [0, 255] minus the dataset mean :data:`SYNTHETIC_MEAN`.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

# The motions, in label order. A motion maps progress p in [0, 1] to a pose offset
# (dx, dy, log_scale, angle) applied to the hand's random starting pose.
MOTIONS = (
    "swipe_left", "swipe_right", "swipe_up", "swipe_down",
    "zoom_in", "zoom_out", "rotate_cw", "rotate_ccw",
    "push", "pull", "shake", "nod",
    "circle_cw", "circle_ccw", "still",
)

SYNTHETIC_MEAN = 127.0


def _motion_pose(motion: str, p: torch.Tensor, amplitude: float):
    """Pose offsets ``(dx, dy, log_scale, angle)`` at progress ``p [T]`` (image y points down)."""
    zero = torch.zeros_like(p)
    a = amplitude
    ramp = p - 0.5  # centred ramp: the hand passes through its start position mid-clip
    bump = torch.sin(math.pi * p)  # 0 -> 1 -> 0
    wave = torch.sin(4 * math.pi * p)  # two full oscillations
    circle = 2 * math.pi * p
    table = {
        "swipe_left": (-1.1 * a * ramp, zero, zero, zero),
        "swipe_right": (1.1 * a * ramp, zero, zero, zero),
        "swipe_up": (zero, -1.1 * a * ramp, zero, zero),
        "swipe_down": (zero, 1.1 * a * ramp, zero, zero),
        "zoom_in": (zero, zero, 1.6 * a * ramp, zero),
        "zoom_out": (zero, zero, -1.6 * a * ramp, zero),
        "rotate_cw": (zero, zero, zero, 3.0 * a * ramp),
        "rotate_ccw": (zero, zero, zero, -3.0 * a * ramp),
        "push": (zero, zero, -0.8 * a * bump, zero),
        "pull": (zero, zero, 0.8 * a * bump, zero),
        "shake": (0.35 * a * wave, zero, zero, zero),
        "nod": (zero, 0.35 * a * wave, zero, zero),
        "circle_cw": (0.35 * a * torch.sin(circle), -0.35 * a * torch.cos(circle), zero, zero),
        "circle_ccw": (-0.35 * a * torch.sin(circle), -0.35 * a * torch.cos(circle), zero, zero),
        "still": (zero, zero, zero, zero),
    }
    return table[motion]


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape or (1,), generator=generator)


def _ellipse_mask(xx, yy, cx, cy, rx, ry, angle, softness):
    """Soft mask of a rotated ellipse: ~1 inside, ~0 outside, broadcast over leading dims."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = ((xx - cx) * cos + (yy - cy) * sin) / rx
    v = (-(xx - cx) * sin + (yy - cy) * cos) / ry
    return torch.sigmoid((1.0 - torch.sqrt(u * u + v * v + 1e-12)) / softness)


def render_clip(motion: str, frames: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """One clip of ``motion``: ``[3, T, S, S]`` float32 in [0, 255] (mean not subtracted)."""
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    g = generator
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # [-1, 1]
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [S, S]

    # Background: base colour, static clutter, a drifting distractor, per-frame noise.
    background = _uniform(g, 40, 200, 3)[:, None, None].expand(3, size, size).clone()
    for _ in range(int(torch.randint(5, 10, (1,), generator=g))):
        colour = _uniform(g, 0, 255, 3)[:, None, None]
        cx, cy = _uniform(g, -1, 1), _uniform(g, -1, 1)
        if bool(torch.rand(1, generator=g) < 0.5):
            mask = _ellipse_mask(xx, yy, cx, cy, _uniform(g, 0.05, 0.35), _uniform(g, 0.05, 0.35),
                                 _uniform(g, 0, math.pi), 0.05)
        else:
            half_w, half_h = _uniform(g, 0.05, 0.4), _uniform(g, 0.05, 0.4)
            mask = (torch.sigmoid((half_w - (xx - cx).abs()) / 0.02)
                    * torch.sigmoid((half_h - (yy - cy).abs()) / 0.02))
        background = background * (1 - mask) + colour * mask

    t = torch.arange(frames, dtype=torch.float32)
    # Progress with a random start and speed, so no two clips move in lockstep.
    start = float(_uniform(g, 0.0, 0.15))
    span = float(_uniform(g, 0.75, 1.0 - start))
    p = (start + span * t / max(frames - 1, 1)).clamp(0, 1)
    dx, dy, log_scale, angle = _motion_pose(motion, p, float(_uniform(g, 0.8, 1.2)))

    cx = _uniform(g, -0.25, 0.25) + dx + 0.01 * torch.randn(frames, generator=g)
    cy = _uniform(g, -0.2, 0.2) + dy + 0.01 * torch.randn(frames, generator=g)
    scale = float(_uniform(g, 0.19, 0.25)) * torch.exp(log_scale)
    theta = _uniform(g, -0.4, 0.4) + angle
    skin = torch.tensor([225.0, 175.0, 140.0]) + _uniform(g, -30, 30, 3)

    # Per-frame geometry [T, 1, 1] broadcast against the grid [S, S].
    cx, cy, scale, theta = (v.reshape(frames, 1, 1) for v in (cx, cy, scale, theta))
    hand = _ellipse_mask(xx, yy, cx, cy, scale, 1.15 * scale, theta, 0.04)
    # Fingers point "up" from the palm (towards -y when theta = 0); the thumb sticks out sideways.
    for offset, length in ((-0.45, 0.9), (-0.15, 1.0), (0.15, 0.95), (0.45, 0.8), (1.35, 0.7)):
        direction = theta + offset - math.pi / 2
        distance = 1.25 * scale + 0.5 * length * scale
        fx = cx + distance * torch.cos(direction)
        fy = cy + distance * torch.sin(direction)
        finger = _ellipse_mask(xx, yy, fx, fy, 0.55 * length * scale, 0.16 * scale,
                               direction, 0.04)
        hand = torch.maximum(hand, finger)

    distractor_start = _uniform(g, -0.8, 0.8, 2)
    distractor_velocity = _uniform(g, -0.4, 0.4, 2)
    tt = (t / max(frames - 1, 1)).reshape(frames, 1, 1)
    distractor = _ellipse_mask(xx, yy, distractor_start[0] + distractor_velocity[0] * tt,
                               distractor_start[1] + distractor_velocity[1] * tt,
                               0.12, 0.12, torch.zeros(1), 0.05)
    distractor_colour = _uniform(g, 0, 255, 3)

    clip = background[:, None].expand(3, frames, size, size)
    clip = clip * (1 - distractor[None]) + distractor_colour[:, None, None, None] * distractor[None]
    clip = clip * (1 - hand[None]) + skin[:, None, None, None] * hand[None]
    clip = clip + 8.0 * torch.randn(clip.shape, generator=g)
    return clip.clamp(0, 255).to(torch.float32)


class SyntheticGestures(Dataset):
    """Procedural gesture clips, deterministic from ``seed``.

    Args:
        num_clips: number of clips in the dataset.
        num_classes: how many of :data:`MOTIONS` are used (the first ``num_classes``), 2 to 15.
        frames: T, frames per clip.
        size: S, frame side in pixels.
        seed: clip ``i`` is drawn from a generator seeded with ``seed * 1_000_003 + i``; use
            different seeds for the training and validation sets.

    ``dataset[i] -> (clip [3, T, S, S] float32, label int)``.
    """

    def __init__(self, num_clips: int, num_classes: int = 10, frames: int = 16,
                 size: int = 112, seed: int = 0):
        if not 2 <= num_classes <= len(MOTIONS):
            raise ValueError(f"num_classes must be in [2, {len(MOTIONS)}], got {num_classes}")
        if num_clips < 1 or frames < 1 or size < 4:
            raise ValueError(
                f"num_clips, frames must be >= 1 and size >= 4, got {num_clips}, {frames}, {size}")
        self.num_clips = num_clips
        self.num_classes = num_classes
        self.frames = frames
        self.size = size
        self.seed = seed
        self.classes = list(MOTIONS[:num_classes])

    def __len__(self) -> int:
        return self.num_clips

    def label(self, index: int) -> int:
        return index % self.num_classes

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_clips:
            raise IndexError(f"index {index} out of range for {self.num_clips} clips")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = self.label(index)
        # Rendering is hundreds of tiny element-wise ops: one thread is faster than a busy pool.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            clip = render_clip(self.classes[label], self.frames, self.size, generator)
        finally:
            torch.set_num_threads(threads)
        return clip - SYNTHETIC_MEAN, label

    def frame_images(self, index: int) -> torch.Tensor:
        """The clip as displayable frames ``[T, S, S, 3]`` uint8 (for figures)."""
        clip, _ = self[index]
        return (clip + SYNTHETIC_MEAN).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
