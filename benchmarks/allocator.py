"""glibc's malloc thresholds: pinned for steady timings, and what they cost a CPU training step.

glibc serves large blocks with ``mmap`` and adapts the size threshold to what the process frees; it
also gives the top of its heap back to the system past a trim threshold. A training step allocates
and frees many blocks of a few MB (activations, their gradients, the T×P matrix), so depending on
the process's history those blocks are mapped anew and page-faulted on first write, step after
step. The cost lands on whichever code touches the memory first, mostly autograd's backward, and
grows with the memory a step holds at its peak: in one run the wrapper's steps took 3,500 more
page faults than the floor's and spent 7–10 ms more inside ``autograd.grad`` (qm9 T=2).

``perf`` pins both thresholds (what ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do
at start-up) so that its ratios do not depend on that history, and measures the difference in
subprocesses started with and without the two variables.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys

MMAP_THRESHOLD, TRIM_THRESHOLD = 1 << 30, 1 << 31
PINNED = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>


def pin() -> bool:
    """Pin glibc's thresholds in this process; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def _child(kind: str, tasks: int, method: str, rounds: int) -> dict[str, float]:
    import torch

    from . import perf

    torch.set_num_threads(1)
    base = perf.bench(kind, tasks)
    result = perf.paired(
        {method: (perf.floor_step(base.clone()), perf.wrapper_step(base.clone(), method))},
        rounds,
        1,
    )[method]
    return {"floor": result.reference_seconds, "ratio": result.ratio}


def table(kind: str, tasks: int, method: str, repeats: int, rounds: int, progress) -> list[str]:
    """Subprocesses with glibc's default thresholds and with pinned ones, in alternating order:
    the floor's median step in each, and the method's floor ratio in each."""
    default_env = {k: v for k, v in os.environ.items() if k not in PINNED}
    default_env["OMP_NUM_THREADS"] = "1"
    pinned_env = {**default_env, **PINNED}
    runs: dict[str, list[dict[str, float]]] = {"default": [], "pinned": []}
    for r in range(repeats):
        order = ("default", "pinned") if r % 2 == 0 else ("pinned", "default")
        for name in order:
            env = default_env if name == "default" else pinned_env
            command = [sys.executable, "-m", "mtlopt_bench.allocator", kind, str(tasks), method]
            done = subprocess.run(
                [*command, str(rounds)], env=env, capture_output=True, text=True, check=True
            )
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        progress(f"allocator {kind} T={tasks}: round {r + 1}/{repeats}")
    speedups = [
        p["floor"] / d["floor"] for d, p in zip(runs["default"], runs["pinned"], strict=True)
    ]
    lines = [
        f"| glibc thresholds | floor step (ms) | {method} over the floor |",
        "|---|---|---|",
    ]
    for name, label in (("default", "default (adaptive)"), ("pinned", "pinned")):
        floor = statistics.median(run["floor"] for run in runs[name])
        ratio = statistics.median(run["ratio"] for run in runs[name])
        lines.append(f"| {label} | {1e3 * floor:.1f} | {ratio:.2f} |")
    lines.append(
        f"| pinned / default, same pair of processes | {statistics.median(speedups):.2f} | |"
    )
    return lines


if __name__ == "__main__":
    kind, tasks, method, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    print(json.dumps(_child(kind, tasks, method, rounds)))
