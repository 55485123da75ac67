"""The full network of Fig. 1: Res3D + two ConvLSTM layers + MobileNet (shared/SPEC.md).

Stages and shapes at full width for an input ``[B, 3, T, S, S]`` (T' = ceil(T / 2), S' = S / 4):

    res3d      [B, 3, T, S, S]       -> [B, 256, T', S', S']
    convlstm1  [B, T', 256, S', S']  -> [B, T', 256, S', S']    (the cell under test)
    convlstm2  [B, T', 256, S', S']  -> [B, T', 256, S', S']    (cell a, or convlstm for the baseline)
    mobilenet  [B·T', 256, S', S']   -> [B, T', 1024, S'/8, S'/8]   (frames folded into the batch)
    head       mean over T', H, W; Linear -> [B, num_classes]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ..registry import check_variant
from ..counting import count_mult_adds, count_parameters, paper_mult_adds
from ..modules import ConvLSTM, INITS
from .mobilenet import MOBILENET_LAYERS, MobileNet
from .res3d import Res3D

STAGES = ("res3d", "convlstm1", "convlstm2", "mobilenet", "head")


@dataclass
class StageCost:
    """Cost of one stage for one forward call: parameters (biases included), true MACs (as
    FlopCounterMode counts them) and, for the ConvLSTM stages, the paper's Mult-Adds convention
    (weights without biases × H·W, per step and sample, times steps × batch)."""

    name: str
    parameters: int
    mult_adds: int
    output_shape: tuple[int, ...]
    paper_mult_adds: int | None = None


@dataclass
class NetworkSummary:
    input_shape: tuple[int, ...]
    stages: list[StageCost] = field(default_factory=list)
    total_parameters: int = 0
    total_mult_adds: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A markdown table, one row per stage and a total."""
        lines = ["| stage | parameters | MACs (true) | MACs (paper convention) | output |",
                 "|---|---:|---:|---:|---|"]
        for s in self.stages:
            paper = "" if s.paper_mult_adds is None else f"{s.paper_mult_adds / 1e9:.3f} G"
            lines.append(f"| {s.name} | {s.parameters:,} | {s.mult_adds / 1e9:.3f} G | {paper} | "
                         f"{list(s.output_shape)} |")
        lines.append(f"| total | {self.total_parameters:,} | {self.total_mult_adds / 1e9:.3f} G | | |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"GestureNet summary for input {list(self.input_shape)}\n{self.table()}"


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


class GestureNet(nn.Module):
    """Res3D + ConvLSTM + MobileNet gesture classifier (Fig. 1 of the paper, shared/SPEC.md).

    Args:
        num_classes: outputs of the final Linear layer (27 Jester, 249 IsoGD).
        variant: the first ConvLSTM layer's cell: ``"convlstm"``, ``"a"``, ``"b"``, ``"c"``, ``"d"``
            or any registered cell (:func:`convlstm_fast.register_cell`).
        second_variant: the second layer's cell; ``None`` picks ``"convlstm"`` for the baseline
            and ``"a"`` otherwise (as the reference code does for a–d).
        backend: backend of both ConvLSTM layers (``"auto"``, ``"reference"``, ``"cpu"``, ...).
        init: ``"default"`` (PyTorch defaults; ConvLSTM as :func:`~convlstm_fast.modules.init_parameters`)
            or ``"reference"`` (he_normal for every conv/linear kernel, the reference code's
            ConvLSTM initialisation).
        width_mult: scales every channel count (64, 128, 256, 512, 1024 at 1.0); 0.125–0.25 is a
            configuration that trains on a CPU.
        gate_activation: ``"sigmoid"`` or ``"hard_sigmoid"``, for both ConvLSTM layers.
        kernel_size: K of the ConvLSTM cells (3 in the paper).
        in_channels: 3 for RGB, 1 for depth.

    Input ``x [B, in_channels, T, S, S]`` (S = 112 in the paper; any S divisible by 16), output
    logits ``[B, num_classes]``.

    Hooks:
        ``features(x)`` returns the last ConvLSTM layer's hidden states ``[B, T', C, H', W']``
        (T' = ceil(T/2), H' = S/4; the maps of Fig. 3); ``forward_stages(x)`` returns a dict with
        every stage's output (keys :data:`STAGES`); the ConvLSTM layers are the submodules
        ``convlstm1`` and ``convlstm2`` (:class:`~convlstm_fast.ConvLSTM`, batch-first, one layer
        each), so a forward hook on ``net.convlstm2`` sees ``(output, (h_n, c_n))``.
        ``summary(input_shape)`` lists parameters and MACs per stage.
    """

    def __init__(self, num_classes: int, variant: str = "a", second_variant: str | None = None,
                 backend: str = "auto", init: str = "default", width_mult: float = 1.0,
                 gate_activation: str = "sigmoid", kernel_size: int = 3, in_channels: int = 3):
        super().__init__()
        check_variant(variant)
        if second_variant is None:  # SPEC "The full network": the reference code's choice
            second_variant = "convlstm" if variant == "convlstm" else "a"
        check_variant(second_variant)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.config = dict(num_classes=num_classes, variant=variant, second_variant=second_variant,
                           backend=backend, init=init, width_mult=width_mult,
                           gate_activation=gate_activation, kernel_size=kernel_size,
                           in_channels=in_channels)
        self.num_classes = num_classes
        self.variant = variant
        self.second_variant = second_variant
        self.in_channels = in_channels
        widths = tuple(_scaled(c, width_mult) for c in (64, 128, 256))
        self.res3d = Res3D(in_channels, widths)
        hidden = widths[2]
        common = dict(kernel_size=kernel_size, num_layers=1, batch_first=True,
                      gate_activation=gate_activation, init=init, backend=backend)
        self.convlstm1 = ConvLSTM(hidden, hidden, variant=variant, **common)
        self.convlstm2 = ConvLSTM(hidden, hidden, variant=second_variant, **common)
        layers = [(_scaled(c, width_mult), s) for c, s in MOBILENET_LAYERS]
        self.mobilenet = MobileNet(hidden, layers)
        self.head = nn.Linear(self.mobilenet.out_channels, num_classes)
        self.hidden_channels = hidden
        if init == "reference":
            self._init_reference()

    @torch.no_grad()
    def _init_reference(self) -> None:
        # he_normal of the reference code: normal truncated at ±2σ, σ = √(2 / fan_in).
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                fan_in = math.prod(module.weight.shape[1:])
                std = math.sqrt(2.0 / fan_in)
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    module.bias.zero_()

    # -- the stages, one function each, shared by forward, forward_stages and summary ----------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, {self.in_channels}, T, S, S], got {shape}")

    def _stage_functions(self):
        def res3d(x):
            # [B, C, T', H, W] -> batch-first sequence [B, T', C, H, W] for the ConvLSTM.
            return self.res3d(x).transpose(1, 2).contiguous()

        def convlstm1(y):
            return self.convlstm1(y)[0]

        def convlstm2(y):
            return self.convlstm2(y)[0]

        def mobilenet(y):
            batch, steps = y.shape[:2]
            z = self.mobilenet(y.reshape(batch * steps, *y.shape[2:]))
            return z.reshape(batch, steps, *z.shape[1:])

        def head(z):
            return self.head(z.mean(dim=(1, 3, 4)))

        return dict(res3d=res3d, convlstm1=convlstm1, convlstm2=convlstm2,
                    mobilenet=mobilenet, head=head)

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage's output, keyed by :data:`STAGES` (``"head"`` holds the logits)."""
        self._check_input(x)
        outputs = {}
        for name, fn in self._stage_functions().items():
            x = fn(x)
            outputs[name] = x
        return outputs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last ConvLSTM layer's hidden states ``[B, T', C, H', W']`` (for Fig. 3)."""
        self._check_input(x)
        stages = self._stage_functions()
        y = stages["res3d"](x)
        return stages["convlstm2"](stages["convlstm1"](y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in_channels, T, S, S]`` -> logits ``[B, num_classes]``."""
        return self.forward_stages(x)["head"]

    # -- cost ----------------------------------------------------------------------------------
    def stage_modules(self) -> dict[str, nn.Module]:
        return dict(res3d=self.res3d, convlstm1=self.convlstm1, convlstm2=self.convlstm2,
                    mobilenet=self.mobilenet, head=self.head)

    def summary(self, input_shape) -> NetworkSummary:
        """Parameters and MACs per stage for one forward call on an input of ``input_shape``
        (``[B, C, T, S, S]``, or ``[C, T, S, S]`` for B = 1).

        Runs a copy of the network made of fake tensors (``FakeTensorMode``: shapes only, no
        memory, no compute) with the reference backend (every backend's ops count the same
        MACs), each stage under its own
        ``FlopCounterMode``; the total comes from :func:`convlstm_fast.count_mult_adds` of the
        whole network, so the stages must add up to it.
        """
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 4:
            shape = (1,) + shape
        config = dict(self.config, backend="reference")
        fake_mode = FakeTensorMode()
        with fake_mode:
            twin = type(self)(**config).eval()
            x = torch.empty(shape)
            whole = torch.empty(shape)
        twin._check_input(x)
        result = NetworkSummary(input_shape=shape)
        modules = twin.stage_modules()
        with fake_mode, torch.no_grad():
            for name, fn in twin._stage_functions().items():
                with FlopCounterMode(display=False) as counter:
                    y = fn(x)
                macs = counter.get_total_flops() // 2
                paper = None
                if name in ("convlstm1", "convlstm2"):
                    cell = modules[name].cells[0]
                    batch, steps, _, height, width = x.shape
                    paper = paper_mult_adds(cell, height, width) * steps * batch
                result.stages.append(StageCost(name, count_parameters(modules[name]), macs,
                                               tuple(y.shape), paper))
                x = y
            result.total_mult_adds = count_mult_adds(twin, whole)
        result.total_parameters = count_parameters(twin)
        return result
