"""Facts about this process and this machine that several layers read."""

from __future__ import annotations

import os


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux's VmHWM starts afresh at exec, unlike ru_maxrss,
    which would count the pages of the parent that forked us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not on every platform

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (``avx2``, ``avx512f``, ``avx512_vnni``, ...); empty
    where /proc/cpuinfo is not readable (other systems: the native kernels then stay off)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Threads a run uses unless told: one per physical core this process may run on (SMT siblings share a
    core's vector units, and a product that is bound by memory bandwidth or by those units gains nothing from
    a second thread on the same core; measured in docs/BENCHMARKS.md, issue 12)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return cpu_count()
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))
