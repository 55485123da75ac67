"""DistributedDataParallel on 2 CPU processes (gloo, 127.0.0.1 only).

1. One step's gradients under DDP, each process holding half of a global batch, equal the
   single-process gradients on the whole batch (BatchNorm in eval mode, so per-shard batch
   statistics cannot make them differ).
2. The training script itself under ``torchrun --nproc_per_node 2`` trains, shards the data and
   writes one metrics.json and checkpoint.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("safetensors", reason="checkpoints need safetensors")
pytest.importorskip("tqdm", reason="the training loop needs tqdm")

from convlstm_fast.training import checkpoint as ckpt
from convlstm_fast.training.train import DEFAULTS, build_model, forward_loss

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available in this build")

TINY = dict(DEFAULTS, width_mult=1 / 32, variant="a", num_classes=3)
GLOBAL_BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env.pop("WORLD_SIZE", None)
    return env


def _global_batch():
    generator = torch.Generator().manual_seed(1)
    clips = torch.randn(GLOBAL_BATCH, 3, 4, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)
    return clips, labels


WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from convlstm_fast.training.distributed import DistributedContext, wrap_model
    from convlstm_fast.training.train import build_model, forward_loss


    def worker(rank, world_size, port, out, config, clips, labels):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        torch.manual_seed(0)
        model = build_model(config, 3).eval()  # BatchNorm in eval mode
        net = wrap_model(model, DistributedContext(world_size, rank, rank), torch.device("cpu"))
        shard = clips.shape[0] // world_size
        part = slice(rank * shard, (rank + 1) * shard)
        _, loss = forward_loss(net, clips[part], labels[part], None)
        loss.backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{out}/grads{rank}.pt")
        dist.destroy_process_group()


    if __name__ == "__main__":
        port, out = int(sys.argv[1]), sys.argv[2]
        config, clips, labels = torch.load(f"{out}/inputs.pt")
        mp.spawn(worker, args=(2, port, out, config, clips, labels), nprocs=2)
''')


def test_ddp_gradients_equal_single_process(tmp_path):
    clips, labels = _global_batch()
    torch.save((TINY, clips, labels), tmp_path / "inputs.pt")
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)],
                   env=_environment(), check=True, timeout=240)

    torch.manual_seed(0)
    model = build_model(TINY, 3).eval()
    _, loss = forward_loss(model, clips, labels, None)  # mean over the whole global batch
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            # fp32, same math summed in a different order (two halves averaged by all-reduce).
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _torchrun_training(out) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "convlstm_fast.train",
               "--dataset", "synthetic", "--width-mult", str(1 / 32), "--frames", "4",
               "--size", "16", "--num-classes", "3", "--train-clips", "16", "--val-clips", "6",
               "--epochs", "1", "--batch-size", "2", "--workers", "0", "--threads", "1",
               "--device", "cpu", "--no-progress", "--out", str(out)]
    return subprocess.run(command, env=_environment(), capture_output=True, text=True,
                          timeout=120)


def test_training_script_under_torchrun(tmp_path):
    out = tmp_path / "run"
    try:
        result = _torchrun_training(out)
    except subprocess.TimeoutExpired as error:
        # A quiet run takes ~9 s. Once, in CI on torch 2.6, a run printed its epoch and then
        # hung past the timeout; it never recurred in 7 runs here, loaded or not. Process-group
        # teardown under gloo hangs now and then upstream (pytorch/pytorch#75097, #190489);
        # such a hang — every output written, the processes stuck on their way out — gets one
        # more run. A hang before the outputs are complete fails at once.
        finished = (out / "metrics.json").exists() and ckpt.latest_checkpoint(
            out / "checkpoints") is not None
        if not finished:
            raise AssertionError(f"torchrun training hung before finishing: {error.stdout!r}")
        warnings.warn(f"torchrun training hung after writing its outputs; rerun once: "
                      f"{error.stdout!r}")
        out = tmp_path / "rerun"
        result = _torchrun_training(out)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 16 clips over 2 processes, 2 per process and step: 4 steps; all 6 val clips counted once.
    assert metrics["epochs"][0]["step"] == 4
    assert len(metrics["epochs"]) == 1 and 0 <= metrics["epochs"][0]["val_top1"] <= 1
    meta = ckpt.read_meta(ckpt.latest_checkpoint(out / "checkpoints"))
    assert meta["step"] == 4
    model = build_model(meta["config"], 3)
    model.load_state_dict(ckpt.load_model_state(ckpt.latest_checkpoint(out / "checkpoints")))
