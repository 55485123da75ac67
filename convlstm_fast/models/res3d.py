"""The Res3D front end of Fig. 1 (shared/SPEC.md "The full network"): a 3D-conv stem and three
stages of two basic blocks, ``[B, 3, T, S, S] -> [B, 256, ceil(T/2), S/4, S/4]`` at full width.
"""

from __future__ import annotations

from torch import nn


class BasicBlock3d(nn.Module):
    """Res3D basic block: conv3×3×3–BN–ReLU–conv3×3×3–BN, add the shortcut, ReLU.

    The shortcut is a 1×1×1 conv + BN (with the block's stride) when ``projection`` is true,
    the identity otherwise. Convolutions have no bias (BN follows each).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 projection: bool = False):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if projection or stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm3d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Res3D(nn.Module):
    """Block 1 (Conv3d 3×7×7, stride (1, 2, 2), BN, ReLU, no max-pool), then blocks 2a/2b
    (``widths[0]``, 2a with a projection shortcut), 3a/3b (``widths[1]``, 3a strided by 2 in
    T, H and W) and 4a/4b (``widths[2]``, 4a with a projection shortcut).

    ``x [B, Cin, T, S, S] -> [B, widths[2], ceil(T/2), ceil(S/4), ceil(S/4)]``.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, int, int] = (64, 128, 256)):
        super().__init__()
        w2, w3, w4 = widths
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, w2, (3, 7, 7), (1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(w2),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(
            BasicBlock3d(w2, w2, projection=True),   # 2a
            BasicBlock3d(w2, w2),                    # 2b
            BasicBlock3d(w2, w3, stride=2),          # 3a
            BasicBlock3d(w3, w3),                    # 3b
            BasicBlock3d(w3, w4, projection=True),   # 4a
            BasicBlock3d(w4, w4),                    # 4b
        )
        self.out_channels = w4

    def forward(self, x):
        return self.blocks(self.stem(x))
