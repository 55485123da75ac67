"""The GPU proof of convlstm_fast in one call, on a fresh GPU machine — or rehearsed without one.

    python benchmarks/gpu_check.py [--out DIR] [--rehearse] [--budget SECONDS] [STAGE ...]
    (or: bash benchmarks/gpu_check.sh ...)

The GPU machine (an H200: Python 3.12, torch 2.11.0+cu130, triton 3.6.0, nvcc 13.0, 16 cores, no
internet) is lent for 15 minutes in all, its start-up included. The default run therefore fits in
``--budget`` seconds of commands (470: under 8 minutes) and runs its stages in order of value,
each writing its results as it goes, so that a kill keeps everything that finished:

  build        the CUDA kernels compiled for the device's architecture
               (``pip install --no-deps --no-build-isolation -e .``, MAX_JOBS = cores), then
               ``python -m convlstm_fast.info --require cuda,triton``
  correctness  ``tests/test_backends.py -m "gpu and not extended"``: every GPU backend × variant
               in fp32 (hard_sigmoid) and bf16 (sigmoid) against the float64 reference — the
               real kernels (tests/conftest.py refuses GPU tests in an interpreted session) —
               and tests/test_graphs.py's CUDA-graph captures against eager;
               then benchmarks/wgrad_probe.py (cuDNN's fp32 weight gradient, batched or per step);
               like every test stage, in up to 8 pytest-xdist processes where it is installed,
               so that their Triton JIT compiles run side by side
  bench        variants a and convlstm at the paper's layer (B=8 T=16 256 ch 28×28 bf16):
               triton, cuda (each also as CUDA graphs), eager reference, torch.compile of the
               reference; forward and forward+backward do_bench medians beside the
               memory/compute floor
  sanitizer    compute-sanitizer initcheck of every kernel (reports in our kernels counted apart
               from the libraries') on the CUDA backend, then memcheck of both GPU backends
               (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so overruns inside the caching allocator's
               blocks show), on the quick cases of benchmarks/sanitizer_cases.py
By name only: ``full`` (every GPU test), ``paper`` (``python -m convlstm_fast.bench --paper``),
``fp16`` and ``k5`` (the extended correctness cases in fp16 / at K = 5).

Each stage gets at most its cap and never more than the budget left after the minimum the later
stages need; a stage past its time is killed (its process group) and marked TIMEOUT. Outputs
land flat in ``--out`` (default: $OUT, else ./gpu_check_out): at most 8 files of at most 16 MiB
(what the device tool brings back), ``summary.md`` first written and last printed.

``--rehearse`` runs the same script on a machine without a GPU (CI does): the build logic (CUDA
toolkit and header detection, architecture, the install command) without the compile, the test
selection (collected, all skipped), the bench on a tiny CPU case, the sanitizer cases without
the sanitizer, the output packing and its limits, and the stage timeouts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 470.0
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 1024 * 1024
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
SUMMARY = "summary.md"
# The headline bench: the paper's layer (SPEC "The full network"), B,T,Cin,C,H,W.
PAPER_LAYER = "8,16,256,256,28,28"
CORRECTNESS_MARKERS = "gpu and not extended"
# The bench stage's backends: both GPU backends, each also replayed as CUDA graphs (the launches
# of its host loop gone), the eager reference and torch.compile of it.
BENCH_BACKENDS = "triton,cuda,triton+graphs,cuda+graphs,reference,compile"


@dataclasses.dataclass
class Command:
    """One process of a stage: ``argv`` run in ``cwd`` with ``env`` added, output appended to the
    stage's log. ``allow_failure`` commands (environment reports) do not fail the stage."""

    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    cwd: str = REPO
    allow_failure: bool = False


@dataclasses.dataclass
class Stage:
    name: str
    cap_s: float  # the longest it may run
    min_s: float  # what it needs at least: earlier stages leave this much of the budget
    commands: Callable[["Context", float], list[Command]]  # (context, timeout) -> commands
    default: bool = True
    notes: Callable[["Context"], str] = lambda ctx: ""


@dataclasses.dataclass
class Context:
    out: str
    python: str
    rehearse: bool
    arch: str
    workers: int = 0  # pytest-xdist processes for the test stages (0: none, one process)


def _python_cmd(ctx: Context, *args: str, **kwargs) -> Command:
    return Command([ctx.python, *args], **kwargs)


def device_arch(python: str, rehearse: bool) -> str:
    """``major.minor`` of cuda:0 (asked in a child process, so this one never touches CUDA); in a
    rehearsal, or when no device answers, the H200's 9.0."""
    if rehearse:
        return "9.0"
    probe = subprocess.run([python, "-c", "import torch; print('%d.%d' % "
                            "torch.cuda.get_device_capability())"],
                           capture_output=True, text=True, timeout=120)
    arch = probe.stdout.strip()
    return arch if re.fullmatch(r"\d+\.\d+", arch) else "9.0"


def xdist_workers(python: str) -> int:
    """pytest-xdist processes for the test stages: each Triton specialisation a test needs is a
    JIT compile of seconds (K = 3 kernels: 6 s median, 23 s at most on a 2-core VM, measured
    ahead of time), one after another in a single process; the default selection's ~60 would
    overrun its stage. Its tests are independent (variant × dtype × backend), so up to 8
    processes (never more than the cores) compile side by side, sharing triton's disk cache.
    0 where pytest-xdist is not installed."""
    probe = subprocess.run([python, "-c", "import xdist"], capture_output=True, timeout=120)
    return min(8, os.cpu_count() or 1) if probe.returncode == 0 else 0


def build_env(ctx: Context) -> dict[str, str]:
    return {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": ctx.arch,
            "MAX_JOBS": str(os.cpu_count() or 1)}


INSTALL = ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]


def build_commands(ctx: Context, timeout_s: float) -> list[Command]:
    env_report = ("import platform, torch, triton; print('python', platform.python_version(), "
                  "'torch', torch.__version__, 'triton', triton.__version__, 'cuda', "
                  "torch.version.cuda); print('devices', [torch.cuda.get_device_name(i) for i in "
                  "range(torch.cuda.device_count())])")
    if ctx.rehearse:
        plan = (f"import json, sys; sys.path.insert(0, {REPO!r}); "
                "sys.argv = ['setup.py']; import importlib.util as u; "
                f"s = u.spec_from_file_location('s', {os.path.join(REPO, 'setup.py')!r}); "
                "m = u.module_from_spec(s); s.loader.exec_module(m); home = m.cuda_home(); "
                "print(json.dumps({'cuda_home': home, 'library_includes': "
                "m.cuda_library_includes(home)}))")
        install = " ".join([ctx.python, *INSTALL])
        env = " ".join(f"{k}={v}" for k, v in build_env(ctx).items())
        return [_python_cmd(ctx, "-c", env_report, allow_failure=True),
                _python_cmd(ctx, "-c", plan),
                Command(["echo", f"rehearsal: would run `{env} {install}` (CI builds the same "
                                 "way in its install step)"]),
                _python_cmd(ctx, "-m", "convlstm_fast.info", "--require", "reference,cpu",
                            cwd=ctx.out)]
    return [Command(["nvidia-smi"], allow_failure=True),
            _python_cmd(ctx, "-c", env_report, allow_failure=True),
            _python_cmd(ctx, *INSTALL, env=build_env(ctx)),
            _python_cmd(ctx, "-m", "convlstm_fast.info", "--require", "cuda,triton",
                        cwd=ctx.out)]


def pytest_command(ctx: Context, name: str, paths: list[str], markers: str,
                   keyword: str | None = None) -> Command:
    """pytest from the output folder (so the repository root is not first on sys.path),
    JUnit XML beside the log."""
    argv = ["-m", "pytest", *[os.path.join(REPO, p) for p in paths], "-m", markers, "-q", "-ra",
            "-p", "no:cacheprovider", "-p", "no:benchmark", f"--junitxml={os.path.join(ctx.out, name + '.xml')}"]
    if keyword:
        argv += ["-k", keyword]
    if ctx.workers > 1:
        argv += ["-n", str(ctx.workers)]
    return _python_cmd(ctx, *argv, cwd=ctx.out)


def correctness_commands(ctx: Context, timeout_s: float) -> list[Command]:
    # Then a second of cuDNN: is its fp32 weight gradient less accurate batched over all steps
    # (the fused backends) than step by step (the reference)? It reports, it never fails.
    probe = os.path.join(REPO, "benchmarks", "wgrad_probe.py")
    return [pytest_command(ctx, "correctness", ["tests/test_backends.py", "tests/test_graphs.py"],
                           CORRECTNESS_MARKERS),
            _python_cmd(ctx, probe, "--device", "cpu" if ctx.rehearse else "cuda", cwd=ctx.out,
                        allow_failure=True)]


def extended_command(ctx: Context, keyword: str) -> Command:
    """The extended correctness cases (fp16, K = 5) selected by their id."""
    return pytest_command(ctx, keyword, ["tests/test_backends.py"], "gpu", keyword)


def bench_commands(ctx: Context, timeout_s: float) -> list[Command]:
    # The suite starts no case after --time-budget: leave the last case time to finish.
    budget = max(10.0, timeout_s - 75.0)
    common = ["-m", "convlstm_fast.bench", "--variants", "a,convlstm", "--no-network",
              "--no-sweep", "--no-progress", "--no-plots", "--out", ctx.out, "--stem", "bench",
              "--time-budget", f"{budget:.0f}"]
    if ctx.rehearse:
        return [_python_cmd(ctx, *common, "--device", "cpu", "--dtype", "float32", "--shape",
                            "1,2,8,8,8,8", "--backends", BENCH_BACKENDS.replace(",compile", ""),
                            "--repeats", "2", cwd=ctx.out)]
    return [_python_cmd(ctx, *common, "--device", "cuda", "--dtype", "bfloat16", "--shape",
                        PAPER_LAYER, "--backends", BENCH_BACKENDS, cwd=ctx.out)]


def sanitizer_binary() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        candidate = os.path.join(home, "bin", "compute-sanitizer") if home else ""
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def sanitizer_commands(ctx: Context, timeout_s: float) -> list[Command]:
    cases = os.path.join(REPO, "benchmarks", "sanitizer_cases.py")
    if ctx.rehearse:
        return [Command(["echo", f"rehearsal: compute-sanitizer is {sanitizer_binary()}; "
                                 "running the cases without it, on the CPU"]),
                _python_cmd(ctx, cases, "--quick", "--device", "cpu", "--backends", "cpu",
                            cwd=ctx.out)]
    sanitizer = sanitizer_binary() or "compute-sanitizer"
    no_caching = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    initcheck_log = os.path.join(tempfile.gettempdir(), "convlstm-fast-initcheck.log")
    if os.path.exists(initcheck_log):  # an earlier run's, on the same machine
        os.remove(initcheck_log)
    return [
        # initcheck first (its question is the open one), every kernel instrumented: a filter to
        # our kernels leaves the writes of cuDNN's and ATen's kernels unseen. The libraries'
        # own reports (workspace they read uninitialised by design) are counted apart by
        # sanitizer_cases.py --initcheck-log, which fails the stage on a report of ours.
        Command([sanitizer, "--tool", "initcheck", "--print-limit", "20000", "--log-file",
                 initcheck_log, ctx.python, cases, "--quick", "--backends", "cuda"],
                env=no_caching, cwd=ctx.out),
        _python_cmd(ctx, cases, "--initcheck-log", initcheck_log, cwd=ctx.out),
        Command([sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--leak-check", "no",
                 ctx.python, cases, "--quick", "--backends", "cuda,triton"], env=no_caching,
                cwd=ctx.out),
    ]


def full_commands(ctx: Context, timeout_s: float) -> list[Command]:
    return [pytest_command(ctx, "full", ["tests/test_backends.py", "tests/test_triton_gpu.py",
                                         "tests/test_native_cuda.py", "tests/test_graphs.py",
                                         "tests/test_sequence_options.py"], "gpu")]


def paper_commands(ctx: Context, timeout_s: float) -> list[Command]:
    device = ["--device", "cpu", "--quick"] if ctx.rehearse else ["--paper"]
    return [_python_cmd(ctx, "-m", "convlstm_fast.bench", *device, "--no-progress", "--no-plots",
                        "--out", ctx.out, "--stem", "paper", "--time-budget",
                        f"{max(10.0, timeout_s - 90.0):.0f}", cwd=ctx.out)]


def _tests_summary(ctx: Context, name: str) -> str:
    """The last pytest summary line of the stage's log (``5 passed, 3 skipped in 9.1s``)."""
    path = os.path.join(ctx.out, name + ".log")
    lines = open(path, errors="replace").read().splitlines() if os.path.exists(path) else []
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|skipped|error)", line):
            note = line.strip("= ")
            for other in reversed(lines):
                if other.startswith("triton specialisations compiled"):
                    return f"{note}; {other}"
            return note
    return ""


def _bench_summary(ctx: Context, stem: str = "bench") -> str:
    path = os.path.join(ctx.out, stem + ".json")
    try:
        result = json.load(open(path))
    except (OSError, ValueError):
        return "no JSON"
    rows = []
    for record in result.get("latency", []):
        floor = record.get("floor_ms")
        profile = record.get("profile") or {}
        busy = profile["kernel_ms"] / profile["wall_ms"] if profile.get("wall_ms") else None
        rows.append(f"{record['variant']}/{record['backend']}/{record['mode']} "
                    f"{record['median_ms']:.3g} ms"
                    + (f" ({record['median_ms'] / floor:.1f}x floor)" if floor else "")
                    + (f" GPU busy {busy:.0%}" if busy is not None else ""))
    state = "" if result.get("complete") else " (incomplete)"
    return ("; ".join(rows) or "no timed case") + state


STAGES = [
    Stage("build", 210, 60, build_commands),
    Stage("correctness", 170, 45, correctness_commands,
          notes=lambda c: _tests_summary(c, "correctness")),
    Stage("bench", 170, 60, bench_commands, notes=_bench_summary),
    Stage("sanitizer", 220, 30, sanitizer_commands),
    Stage("full", 590, 60, full_commands, default=False, notes=lambda c: _tests_summary(c, "full")),
    Stage("paper", 590, 60, paper_commands, default=False,
          notes=lambda c: _bench_summary(c, "paper")),
    Stage("fp16", 300, 45, lambda c, t: [extended_command(c, "fp16")], default=False,
          notes=lambda c: _tests_summary(c, "fp16")),
    Stage("k5", 300, 45, lambda c, t: [extended_command(c, "k5")], default=False,
          notes=lambda c: _tests_summary(c, "k5")),
]


def run_command(command: Command, log, timeout_s: float) -> tuple[int, bool]:
    """Run ``command`` in its own process group with output appended to ``log``; kill the whole
    group (SIGTERM, then SIGKILL) past ``timeout_s``. Returns ``(exit status, timed out)``."""
    log.write(f"\n$ {' '.join(command.argv)}\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **command.env}
    process = subprocess.Popen(command.argv, cwd=command.cwd, env=env, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        return process.wait(timeout=max(1.0, timeout_s)), False
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        log.write(f"\n[gpu_check] killed after {timeout_s:.0f} s\n")
        return 124, True


def run_stage(stage: Stage, ctx: Context, timeout_s: float) -> tuple[str, float]:
    """Run the stage's commands one after another within ``timeout_s``; returns its verdict
    (``ok``, ``FAILED``, ``TIMEOUT``) and the seconds it took."""
    started = time.monotonic()
    commands = stage.commands(ctx, timeout_s)
    verdict = "ok"
    with open(os.path.join(ctx.out, stage.name + ".log"), "a", errors="replace") as log:
        for command in commands:
            left = timeout_s - (time.monotonic() - started)
            if left <= 1:
                verdict = "TIMEOUT"
                break
            try:
                status, timed_out = run_command(command, log, left)
            except OSError as error:  # e.g. compute-sanitizer missing
                log.write(f"[gpu_check] cannot run {command.argv[0]}: {error}\n")
                status, timed_out = 127, False
            if timed_out:
                verdict = "TIMEOUT"
                break
            if status != 0 and not command.allow_failure:
                verdict = "FAILED"
                log.write(f"[gpu_check] exit status {status}\n")
                break
    return verdict, time.monotonic() - started


def _truncate(path: str, limit: int) -> None:
    """Keep a text file under ``limit`` bytes: its first and last halves, a marker between."""
    size = os.path.getsize(path)
    if size <= limit:
        return
    half = limit // 2 - 256
    with open(path, "rb") as handle:
        head = handle.read(half)
        handle.seek(size - half)
        tail = handle.read()
    with open(path, "wb") as handle:
        handle.write(head + f"\n[gpu_check] {size - 2 * half} bytes cut\n".encode() + tail)


def pack_outputs(out: str) -> list[str]:
    """Hold the output folder to what one device call brings back: at most MAX_FILES plain
    files directly in ``out`` with safe names, each under MAX_FILE_BYTES (longer logs keep their
    head and tail). Logs beyond the file count are merged into ``logs.txt``. Returns the
    problems that could not be fixed (none in a correct run)."""
    problems = []
    entries = sorted(os.listdir(out))
    for name in entries:
        path = os.path.join(out, name)
        if not os.path.isfile(path) or os.path.islink(path):
            problems.append(f"{name}: not a plain file")
        elif not SAFE_NAME.match(name):
            problems.append(f"{name}: name has characters the device tool does not bring back")
    files = [n for n in entries if os.path.isfile(os.path.join(out, n))]
    if len(files) > MAX_FILES:
        logs = [n for n in files if n.endswith(".log")]
        merged = os.path.join(out, "logs.txt")
        with open(merged, "a", errors="replace") as target:
            for name in logs:
                target.write(f"\n===== {name} =====\n")
                target.write(open(os.path.join(out, name), errors="replace").read())
                os.remove(os.path.join(out, name))
        files = sorted(os.listdir(out))
        if len(files) > MAX_FILES:
            problems.append(f"{len(files)} files, at most {MAX_FILES} come back: {files}")
    for name in files:
        path = os.path.join(out, name)
        if name.endswith((".log", ".txt", ".md")):
            _truncate(path, MAX_FILE_BYTES - 4096)
        if os.path.getsize(path) > MAX_FILE_BYTES:
            problems.append(f"{name}: {os.path.getsize(path)} bytes, over {MAX_FILE_BYTES}")
    return problems


def _write_summary(ctx: Context, rows: list[tuple[str, str, float, str]], budget: float,
                   problems: list[str], finished: bool) -> str:
    mode = "rehearsal (no GPU)" if ctx.rehearse else "GPU"
    lines = [f"# convlstm_fast GPU check — {mode}", "",
             f"arch {ctx.arch}, budget {budget:.0f} s of commands, "
             f"{ctx.workers or 'no'} pytest-xdist workers"
             + ("" if finished else " — still running (a kill keeps the rows so far)"), "",
             "| stage | verdict | seconds | notes |", "|---|---|---|---|"]
    lines += [f"| {name} | {verdict} | {seconds:.0f} | {notes} |"
              for name, verdict, seconds, notes in rows]
    lines += [f"- packing: {p}" for p in problems]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(ctx.out, SUMMARY + ".tmp"), "w") as handle:
        handle.write(text)
    os.replace(os.path.join(ctx.out, SUMMARY + ".tmp"), os.path.join(ctx.out, SUMMARY))
    return text


def stage_timeouts(stages: list[Stage], budget: float) -> list[tuple[float, float]]:
    """``(cap, reserve)`` per stage: it may run until its cap, but leaves ``reserve`` seconds (the
    minimum of every later stage) of the budget."""
    reserves = []
    for index in range(len(stages)):
        reserves.append(sum(s.min_s for s in stages[index + 1:]))
    return [(stage.cap_s, reserve) for stage, reserve in zip(stages, reserves)]


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in STAGES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", metavar="STAGE",
                        help=f"{' | '.join(names)} | all (default: the default stages)")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.getcwd(),
                                                                               "gpu_check_out"))
    parser.add_argument("--rehearse", action="store_true",
                        help="run without a GPU: everything except what needs the device")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds of commands for the whole run (default: %(default)s)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    wanted = args.stages or [s.name for s in STAGES if s.default]
    if wanted == ["all"]:
        wanted = names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {names} or all")
    stages = [s for s in STAGES if s.name in wanted]
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    ctx = Context(out, args.python, args.rehearse, device_arch(args.python, args.rehearse),
                  xdist_workers(args.python))
    started = time.monotonic()
    rows: list[tuple[str, str, float, str]] = []
    for stage, (cap, reserve) in zip(stages, stage_timeouts(stages, args.budget)):
        left = args.budget - (time.monotonic() - started)
        timeout = min(cap, left - reserve)
        if timeout < stage.min_s:
            rows.append((stage.name, "SKIPPED", 0.0, f"{left:.0f} s left of the budget"))
            continue
        verdict, seconds = run_stage(stage, ctx, timeout)
        rows.append((stage.name, verdict, seconds, stage.notes(ctx)))
        _write_summary(ctx, rows, args.budget, [], finished=False)
    problems = pack_outputs(out)
    text = _write_summary(ctx, rows, args.budget, problems, finished=True)
    print(text)
    failed = problems or any(verdict != "ok" for _, verdict, _, _ in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
