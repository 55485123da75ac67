"""convlstm_fast.ops.aten_calls: what counts as a launch, and counting inside our own ops."""

import pytest
import torch

from convlstm_fast import _extension
from convlstm_fast.ops.aten_calls import AtenCalls


def test_views_and_allocations_are_not_counted_out_and_inplace_are():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with AtenCalls() as aten:
        a.view(4, 3).t()
        torch.empty(3)
        torch.mm(a, b, out=torch.empty(3, 2))
        a.add_(1)
        a.sum()
    assert aten.calls == {"mm": 1, "add_": 1, "sum": 1}


def test_paused_counts_nothing():
    with AtenCalls(paused=lambda: True) as aten:
        torch.randn(3).sum()
    assert not aten.calls


@pytest.mark.skipif(not _extension.extension_built(), reason="the compiled extension is not built")
def test_into_own_ops_counts_what_their_kernel_issues():
    from convlstm_fast import ConvLSTM

    model = ConvLSTM(3, 4, variant="convlstm", backend="cpu")
    x = torch.randn(2, 3, 3, 5, 5)
    with torch.no_grad():
        with AtenCalls() as outside:
            model(x)
        with AtenCalls(into_own_ops=True) as inside:
            expected = model(x)[0]
    assert "convlstm_layer_inference" in outside.calls
    assert "convlstm_layer_inference" not in inside.calls and sum(inside.calls.values()) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], expected)
