"""Checkpoints: round trip of weights, momentum buffers and RNG states; atomic writes; loading
on every backend."""

import json
import os

import pytest
import torch

pytest.importorskip("safetensors", reason="checkpoints need safetensors")

from convlstm_fast.backends import get_backend
from convlstm_fast.models import GestureNet
from convlstm_fast.training import checkpoint as ckpt


@pytest.fixture(autouse=True)
def one_thread():
    # The 2 cores are shared: small ops run far faster on one thread than on a contended pool.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_net(backend="reference", variant="a"):
    torch.manual_seed(0)
    return GestureNet(3, variant=variant, backend=backend, width_mult=1 / 32)


def _one_step(net, optimizer):
    x = torch.randn(2, 3, 2, 16, 16)
    loss = torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 2]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    net = _tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    _one_step(net, optimizer)
    path = ckpt.save_checkpoint(tmp_path, net, optimizer, {"step": 1, "epoch": 0})
    after_save = torch.rand(5)

    other = GestureNet(3, variant="a", backend="reference", width_mult=1 / 32)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.5, momentum=0.9)
    meta = ckpt.load_checkpoint(path, other, other_optimizer)
    assert meta["step"] == 1
    torch.testing.assert_close(torch.rand(5), after_save, rtol=0, atol=0)  # RNG restored
    for (name, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert other_optimizer.param_groups[0]["lr"] == 0.1
    assert other_optimizer.param_groups[0]["weight_decay"] == 1e-4
    for p, q in zip(net.parameters(), other.parameters()):
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"],
                                   other_optimizer.state[q]["momentum_buffer"], rtol=0, atol=0)
    # The checkpoint is safetensors + JSON only.
    assert sorted(os.listdir(path)) == ["meta.json", "model.safetensors", "optimizer.safetensors"]
    json.loads((path / "meta.json").read_text())


def test_latest_pointer_pruning_and_leftover_temporaries(tmp_path):
    net = _tiny_net()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, net, None, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    # A run killed while writing leaves a .tmp- directory (and maybe a stale pointer): ignored.
    broken = tmp_path / "step-00000004.tmp-999"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    (tmp_path / "latest").write_text("step-00000009\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"


def test_failure_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    net = _tiny_net()
    ckpt.save_checkpoint(tmp_path, net, None, {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, net, None, {"step": 2})
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    net.load_state_dict(ckpt.load_model_state(latest))


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", "triton"])
def test_checkpoint_loads_on_every_backend(tmp_path, backend):
    device = "cpu" if backend in ("reference", "cpu") else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"backend {backend!r} needs a CUDA device")
    reason = get_backend(backend).unsupported_reason("a", torch.zeros(1, device=device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} not usable here: {reason}")
    trained = _tiny_net("reference", variant="a").eval()
    ckpt.save_checkpoint(tmp_path, trained, None, {"step": 1})
    loaded = GestureNet(3, variant="a", backend=backend, width_mult=1 / 32).to(device).eval()
    loaded.load_state_dict(ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path), device))
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        # fp32, different summation orders of the same math: atol/rtol 1e-4 on the logits.
        torch.testing.assert_close(loaded(x.to(device)).cpu(), trained(x), rtol=1e-4, atol=1e-4)
