"""How accurate cuDNN's fp32 weight gradient of a 'same' convolution is, batched over all steps or
step by step — the open question of the H200's first GPU check.

    python benchmarks/wgrad_probe.py [--device cuda]

There the fp32 ``grad_weight_h`` of the original ConvLSTM came out 1.6x over STYLE.md's bound on
both fused backends (tests/test_backends.py, case "fp32", shape "small"), which compute it in ONE
``convolution_backward`` over the T·B frames, while the reference's autograd makes one call per
step (B frames) and sums the T results. This probe computes dW for random data of that case's
shape (T=3, B=2, C=80 -> 4C=320, 8×10, K=3; TF32 off) both ways, and batched with cuDNN's
deterministic algorithms, and prints each one's max|dW − dW₆₄| beside the float64 result's
magnitude: whether the batched call is the less accurate one, and whether summing per-step
calls (what the fix would do) recovers the reference's accuracy. Never fails: it reports.
"""

from __future__ import annotations

import argparse

import torch


def weight_grad(dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, steps: int,
                per_step: bool) -> torch.Tensor:
    """d W of ``conv(h, weight)`` given ``dz``, over ``steps`` × B frames."""
    pad = [weight.shape[-1] // 2] * 2

    def call(dz_part, h_part):
        return torch.ops.aten.convolution_backward(
            dz_part, h_part, weight, None, [1, 1], pad, [1, 1], False, [0, 0], 1,
            [False, True, False])[1]

    if not per_step:
        return call(dz, h)
    batch = dz.shape[0] // steps
    total = torch.zeros_like(weight)
    for t in reversed(range(steps)):  # autograd's order: the last step's gradient first
        total += call(dz[t * batch:(t + 1) * batch], h[t * batch:(t + 1) * batch])
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to probe")
        return 0
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    steps, batch, hidden, height, width, ksize = 3, 2, 80, 8, 10, 3
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(steps * batch, hidden, height, width, generator=generator, dtype=torch.float64)
    dz = torch.randn(steps * batch, 4 * hidden, height, width, generator=generator,
                     dtype=torch.float64) * 0.1
    weight = torch.randn(4 * hidden, hidden, ksize, ksize, generator=generator,
                         dtype=torch.float64) * (hidden * ksize * ksize) ** -0.5
    on = dict(device=args.device)
    exact = weight_grad(dz.to(**on), h.to(**on), weight.to(**on), steps, per_step=False).cpu()
    h32, dz32, w32 = (t.to(dtype=torch.float32, **on) for t in (h, dz, weight))
    print(f"dW [{4 * hidden}, {hidden}, {ksize}, {ksize}] over T={steps} x B={batch} frames of "
          f"{height}x{width}; max|dW64| = {exact.abs().max().item():.3e}")
    for label, per_step, deterministic in (("per step, summed (the reference)", True, False),
                                           ("batched over T*B (the fused backends)", False, False),
                                           ("batched, cudnn.deterministic", False, True)):
        torch.backends.cudnn.deterministic = deterministic
        grad = weight_grad(dz32, h32, w32, steps, per_step).double().cpu()
        print(f"  {label}: max|dW - dW64| = {(grad - exact).abs().max().item():.3e}")
    torch.backends.cudnn.deterministic = False
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
