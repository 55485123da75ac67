"""Training loop, resume, evaluation and Fig. 3 on tiny synthetic configurations (CPU)."""

import json

import pytest
import torch

pytest.importorskip("safetensors", reason="checkpoints need safetensors")
pytest.importorskip("tqdm", reason="the training loop needs tqdm")
from safetensors.torch import load_file  # noqa: E402

from convlstm_fast.training import checkpoint as ckpt
from convlstm_fast.training.train import (DEFAULTS, PRESETS, amp_dtype, build_model,
                                          build_parser, explicit_overrides, main,
                                          parameter_groups, poly_lr, resolve_config, train)

TINY = dict(DEFAULTS, dataset="synthetic", width_mult=1 / 32, frames=4, size=16, num_classes=3,
            train_clips=16, val_clips=6, epochs=2, batch_size=4, lr=0.05, workers=0,
            backend="auto", preset=None, threads=1)  # 1 thread: the 2 cores are shared


@pytest.fixture(autouse=True)
def one_thread():
    # The 2 cores are shared: small ops run far faster on one thread than on a contended pool.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_poly_lr_matches_torch_polynomial_lr():
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=10, power=0.9)
    for step in range(12):
        assert poly_lr(step, 10, 0.1, 0.0, 0.9) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                                 rel=1e-9, abs=1e-12)
        optimizer.step()
        scheduler.step()
    assert poly_lr(0, 10, 1e-3, 1e-6, 0.9) == pytest.approx(1e-3)
    assert poly_lr(10, 10, 1e-3, 1e-6, 0.9) == pytest.approx(1e-6)


def test_quick_preset_and_explicit_flags():
    args = build_parser().parse_args(["--preset", "quick", "--variant", "b", "--epochs", "3",
                                      "--out", "unused"])
    config = resolve_config(args)
    assert config["width_mult"] == PRESETS["quick"]["width_mult"] and config["variant"] == "b"
    assert config["epochs"] == 3 and config["momentum"] == 0.9 and config["lr_end"] == 1e-6
    assert explicit_overrides(args) == {"epochs": 3}
    with pytest.raises(ValueError, match="needs --data"):
        resolve_config(build_parser().parse_args(["--dataset", "jester", "--out", "unused"]))


def test_weight_decay_only_on_kernels():
    model = build_model(TINY, 3)
    decay, no_decay = parameter_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.head.bias for p in no_decay["params"])


def test_autocast_only_on_gpu():
    assert amp_dtype(TINY, torch.device("cpu")) is None
    assert amp_dtype(TINY, torch.device("cuda")) == torch.bfloat16
    assert amp_dtype(dict(TINY, amp="fp16"), torch.device("cuda")) == torch.float16
    assert amp_dtype(dict(TINY, amp="none"), torch.device("cuda")) is None


def _final_weights(out):
    return load_file(str(ckpt.latest_checkpoint(out / "checkpoints") / "model.safetensors"))


def _without_wall_time(metrics):
    return [{k: v for k, v in epoch.items() if k != "wall_s"} for epoch in metrics["epochs"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny run through the command line, 2 epochs × 4 steps, uninterrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    main(["--dataset", "synthetic", "--width-mult", str(1 / 32), "--frames", "4", "--size", "16",
          "--num-classes", "3", "--train-clips", "16", "--val-clips", "6", "--epochs", "2",
          "--batch-size", "4", "--lr", "0.05", "--workers", "0", "--out", str(out),
          "--no-progress", "--device", "cpu", "--threads", "1"])
    return out


def test_metrics_json(uninterrupted):
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    assert metrics["num_classes"] == 3 and len(metrics["epochs"]) == 2
    for epoch in metrics["epochs"]:
        assert epoch["train_loss"] > 0 and 0 <= epoch["val_top1"] <= 1
    assert metrics["epochs"][-1]["step"] == 8
    assert metrics["epochs"][-1]["lr"] == pytest.approx(poly_lr(7, 8, 0.05, 1e-6, 0.9))


def test_resume_mid_epoch_is_bitwise_equal(uninterrupted, tmp_path):
    config = dict(TINY, checkpoint_every=2)
    first = train(config, tmp_path, device_name="cpu", max_steps=3, progress=True)
    assert first["epochs"] == []  # stopped in epoch 1, after step 3
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "checkpoints"))["step"] == 3
    resumed = train(config, tmp_path, resume=True, device_name="cpu", progress=False)
    expected = _final_weights(uninterrupted)
    got = _final_weights(tmp_path)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    reference = json.loads((uninterrupted / "metrics.json").read_text())
    assert _without_wall_time(resumed) == _without_wall_time(reference)


def test_resume_at_epoch_boundary_is_bitwise_equal(uninterrupted, tmp_path):
    train(TINY, tmp_path, device_name="cpu", max_steps=4, progress=False)
    train(TINY, tmp_path, resume=True, device_name="cpu", progress=False)
    expected = _final_weights(uninterrupted)
    for name, value in _final_weights(tmp_path).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_evaluate_reports_the_training_run_top1(uninterrupted, tmp_path):
    pytest.importorskip("matplotlib")
    from convlstm_fast.training.evaluate import main as evaluate

    png = tmp_path / "confusion.png"
    result = evaluate([str(uninterrupted), "--out", str(png), "--backend", "reference",
                       "--json", str(tmp_path / "eval.json")])
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    assert result["top1"] == pytest.approx(metrics["epochs"][-1]["val_top1"], abs=1e-9)
    assert sum(map(sum, result["confusion"])) == 6
    assert png.stat().st_size > 1000


def test_training_curves_png(uninterrupted, tmp_path):
    pytest.importorskip("matplotlib")
    from convlstm_fast.training.curves import main as curves

    curves([str(uninterrupted), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("variant", ["b", "c"])
def test_visualize_fig3_maps(tmp_path, variant):
    pytest.importorskip("matplotlib")
    from convlstm_fast.reference import cells
    from convlstm_fast.training.visualize import main as visualize

    config = dict(TINY, variant=variant, frames=6)
    torch.manual_seed(0)
    model = build_model(config, 3, backend="reference")
    ckpt.save_checkpoint(tmp_path / "checkpoints", model, None,
                         {"step": 0, "config": config, "num_classes": 3,
                          "classes": ["x", "y", "z"]})
    png = tmp_path / "fig.png"
    maps = visualize([str(tmp_path), "--clip", "1", "--out", str(png)])
    assert png.stat().st_size > 1000
    model.eval()
    from convlstm_fast.training.synthetic import SyntheticGestures
    clip, _ = SyntheticGestures(6, 3, frames=6, size=16, seed=1)[1]  # the val set (seed 2·0 + 1)
    with torch.no_grad():
        stages = model.forward_stages(clip[None])
    hidden = stages["convlstm2"][0]
    assert maps["heatmaps"].shape == (3, 16, 16)  # T' = 6 / 2 steps, upsampled to S
    torch.testing.assert_close(maps["hidden"], hidden, rtol=0, atol=0)
    for t in range(3):  # c* maximises sum_hw H_t[c]
        sums = hidden[t].sum(dim=(1, 2))
        assert sums[maps["channels"][t]] == sums.max()
    # The recorded attention comes from a reference run of layer 1 that reproduces the model.
    records = maps["records"]
    attention = torch.stack([r["attention"][0] for r in records])
    if variant == "b":  # softmax over H·W: sums to 1 per step
        torch.testing.assert_close(attention.sum(dim=(-2, -1)), torch.ones(3, 1))
    else:  # exp(Z − max Z): max exactly 1 per channel
        torch.testing.assert_close(attention.amax(dim=(-2, -1)), torch.ones(3, model.hidden_channels))
    cell = model.convlstm1.cells[0]
    params = dict(cell.named_parameters())  # SPEC names, as the reference takes them
    sequence = stages["res3d"].transpose(0, 1)
    zeros = sequence.new_zeros(1, cell.hidden_channels, *sequence.shape[-2:])
    with torch.no_grad():
        output, _, _ = cells.layer(variant, sequence, zeros, zeros, params)
    torch.testing.assert_close(output.transpose(0, 1), stages["convlstm1"], rtol=1e-5, atol=1e-6)
