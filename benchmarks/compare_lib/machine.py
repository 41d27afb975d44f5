"""The machine: CPU model and flags, how busy other processes keep it, memory bandwidth, git state.

Standard library at the top level (numpy is imported inside copy_bandwidth)."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time

from .common import PEERS, ROOT


def peak_rss_mib() -> float:
    """Peak resident set of this process: VmHWM (the high-water mark of this process's own address space).

    resource.getrusage(RUSAGE_SELF).ru_maxrss would do, except that Linux carries it across execve: a worker
    spawned (vfork + exec) by an orchestrator that once held the 2 GiB bandwidth buffers reports >= 2 GiB.
    So take VmHWM and fall back to ru_maxrss where /proc is missing.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), []))
    except OSError:
        return set()


def _proc_stat() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat", encoding="utf-8") as f:
        vals = [float(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def _own_cpu() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores other processes keep busy right now (we are idle while measuring)."""
    b0, t0 = _proc_stat()
    time.sleep(seconds)
    b1, t1 = _proc_stat()
    ncpu = os.cpu_count() or 1
    return round(ncpu * (b1 - b0) / max(t1 - t0, 1e-9), 2)


_WAIT_LEFT = [None]  # seconds of waiting left for the whole run (shared by every check)


def wait_for_quiet(max_busy: float, max_wait_s: float, log) -> float:
    """Wait until other processes use less than max_busy cores, spending at most max_wait_s over the whole run.

    Other engineers' processes may live in other PID namespaces (invisible to ps), so this reads the
    machine-wide /proc/stat while we are idle. Returns the last reading (cores busy)."""
    if _WAIT_LEFT[0] is None:
        _WAIT_LEFT[0] = max_wait_s
    start = time.time()
    while True:
        busy = busy_cores()
        if busy <= max_busy:
            break
        if time.time() - start >= _WAIT_LEFT[0]:
            log(f"  ! other processes keep {busy:.2f} cores busy; going on (wait budget spent)")
            break
        log(f"  .. other processes keep {busy:.2f} cores busy (> {max_busy}); waiting")
        time.sleep(10)
    _WAIT_LEFT[0] = max(0.0, _WAIT_LEFT[0] - (time.time() - start))
    return busy


# ----------------------------------------------------------------------------------- measurement
def copy_bandwidth(threads: int = 2, gib: float = 1.0, repeats: int = 5) -> dict:
    """np.copyto of a `gib` GiB array split over `threads` threads; GB/s counted as read + write bytes."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = int(gib * 2**30) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first

    def run(t: int) -> list[float]:
        bounds = [(i * n // t, (i + 1) * n // t) for i in range(t)]
        out = []
        with ThreadPoolExecutor(t) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
                out.append(2 * n * 8 / (time.perf_counter() - start) / 1e9)
        return out

    one, many = run(1), run(threads)
    return {"method": f"np.copyto of a {gib:g} GiB float64 array split over N threads; bytes read + written, "
                      f"best and median of {repeats}",
            "threads": threads, "gbps_best": round(max(many), 1), "gbps_median": round(statistics.median(many), 1),
            "gbps_1thread_best": round(max(one), 1), "gbps_1thread_median": round(statistics.median(one), 1)}


def memory_bandwidth(threads: int = 2) -> dict:
    """Copy (read + write) bandwidth with numpy, and read bandwidth (what the decode ceiling uses)."""
    copy = copy_bandwidth(threads)
    read = read_bandwidth(threads)
    if read is None:
        read = {"method": "half of the copy's read + write bytes (no C compiler for the read kernel)",
                "gbps_best": round(copy["gbps_best"] / 2, 1), "gbps_median": round(copy["gbps_median"] / 2, 1),
                "gbps_1thread_best": round(copy["gbps_1thread_best"] / 2, 1)}
    return {"threads": threads, "copy_read_plus_write": copy, "read": read,
            "gbps_ceiling": read["gbps_best"], "ceiling_uses": "read bandwidth, best"}


READ_BW_C = r"""
/* Read bandwidth: sum a 1 GiB uint64 array with OpenMP threads; prints the best GB/s of 7. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
    size_t n = ((size_t)1 << 30) / 8;
    uint64_t *a = malloc(n * 8);
    if (!a) return 1;
    for (size_t i = 0; i < n; i++) a[i] = i;
    double best = 0, all[7]; uint64_t sink = 0;
    for (int r = 0; r < 7; r++) {
        double s = now(); uint64_t tot = 0;
        #pragma omp parallel for reduction(+:tot) schedule(static)
        for (size_t i = 0; i < n; i++) tot += a[i];
        all[r] = n * 8 / (now() - s) / 1e9;
        if (all[r] > best) best = all[r];
        sink += tot;
    }
    printf("%.2f", best);
    for (int r = 0; r < 7; r++) printf(" %.2f", all[r]);
    printf(" %llu\n", (unsigned long long)(sink & 1));
    return 0;
}
"""


def read_bandwidth(threads: int) -> dict | None:
    """Pure read bandwidth from a tiny C/OpenMP kernel (compiled once with gcc/cc); None without a compiler.

    Decode streams the weights: a read-only stream. numpy cannot measure one with 2 threads (its reductions
    hold the GIL or are compute-bound), and a copy moves read + write bytes, so this is the figure the
    ceiling uses; without a compiler, the read half of the copy stands in (the two agree on this machine)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return None
    flags = ["-O3", "-funroll-loops", "-fopenmp"]
    f = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= f:
        flags.append("-march=x86-64-v4")
    elif "avx2" in f:
        flags.append("-mavx2")
    import hashlib

    tag = hashlib.sha256((READ_BW_C + " ".join(flags)).encode()).hexdigest()[:12]
    exe = PEERS / f"readbw-{tag}"
    if not exe.exists():
        src = PEERS / f"readbw-{tag}.c"
        PEERS.mkdir(parents=True, exist_ok=True)
        src.write_text(READ_BW_C)
        r = subprocess.run([cc, *flags, str(src), "-o", str(exe)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            return None
    out = {}
    for t in sorted({1, threads}):
        vals = []
        for _ in range(3):  # fresh processes: the figure moves with where the pages land
            r = subprocess.run([str(exe)], capture_output=True, text=True, check=False,
                               env=dict(os.environ, OMP_NUM_THREADS=str(t), OMP_PROC_BIND="false"))
            if r.returncode != 0:
                return None
            vals += [float(x) for x in r.stdout.split()[1:8]]
        out[t] = {"best": max(vals), "median": round(statistics.median(vals), 2)}
    return {"method": f"C/OpenMP sum over a 1 GiB uint64 array ({' '.join(flags)}), best and median of 3 x 7",
            "gbps_best": out[threads]["best"], "gbps_median": out[threads]["median"],
            "gbps_1thread_best": out[1]["best"]}


def git_state() -> str | None:
    """The commit the onnxllm rows ran (the tree is imported live), and whether onnxllm/ had local changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "onnxllm"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" + uncommitted changes in onnxllm/" if dirty else "")


def bw_line(bw: dict) -> str:
    c, r = bw["copy_read_plus_write"], bw["read"]
    return (f"read {r['gbps_best']} GB/s best, {r['gbps_median']} median ({r['gbps_1thread_best']} with 1 thread); "
            f"np.copyto read+write {c['gbps_best']} GB/s best, {c['gbps_median']} median "
            f"({c['gbps_1thread_best']} with 1 thread)")
