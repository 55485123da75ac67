"""Networks built from the ConvLSTM cells: :class:`GestureNet`, the Res3D + ConvLSTM + MobileNet
classifier of Fig. 1 (shared/SPEC.md "The full network")."""

from .gesture_net import STAGES, GestureNet, NetworkSummary, StageCost
from .mobilenet import MobileNet
from .res3d import Res3D

__all__ = ["STAGES", "GestureNet", "MobileNet", "NetworkSummary", "Res3D", "StageCost"]
