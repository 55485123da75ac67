"""The MobileNet back end of Fig. 1 (shared/SPEC.md "The full network"), applied per frame."""

from __future__ import annotations

from torch import nn

# (output channels, stride) of the nine SepConv layers at full width:
# 256 s1, 256 s2, 5 × 512 s1, 1024 s2, 1024 s2.
MOBILENET_LAYERS = ((256, 1), (256, 2)) + ((512, 1),) * 5 + ((1024, 2), (1024, 2))


class SepConvBNReLU6(nn.Module):
    """SepConv with biases (depthwise 3×3 with ``stride``, then pointwise 1×1), BN, ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride, padding=1,
                                   groups=in_channels, bias=True)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.pointwise(self.depthwise(x))))


class MobileNet(nn.Module):
    """Nine SepConv–BN–ReLU6 layers: ``[N, Cin, H, W] -> [N, C_last, H/8, W/8]`` (rounded up);
    ``layers`` holds ``(out_channels, stride)`` per layer."""

    def __init__(self, in_channels: int, layers=MOBILENET_LAYERS):
        super().__init__()
        modules = []
        for out_channels, stride in layers:
            modules.append(SepConvBNReLU6(in_channels, out_channels, stride))
            in_channels = out_channels
        self.layers = nn.Sequential(*modules)
        self.out_channels = in_channels

    def forward(self, x):
        return self.layers(x)
