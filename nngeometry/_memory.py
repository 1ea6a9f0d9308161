"""How much memory this process can still allocate, and the refusal of an allocation that
cannot fit: shared by the engine (per-example Jacobians, Gram matrices, Hessians) and the
representations (dense matrices and blocks), which both import it from here.

The refusal comes before the allocation, so that a result too large says what to use instead
rather than failing in the allocator, or getting the process killed, after a whole pass over
the data. Tests replace `available_memory` (this module's attribute) to simulate a small
machine: every check reads it through the module.
"""
try:
    import resource
except ImportError:  # not on every platform (Windows has no RLIMIT_AS)
    resource = None


def format_bytes(n):
    """``n`` bytes in the largest binary unit that keeps the value at least 1 (``"1.5 GiB"``)."""
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def check_fits(need_bytes, what, alternatives, limit_bytes=None):
    """``MemoryError`` naming ``what``, its size and ``alternatives`` if ``need_bytes`` is more
    than this process can still allocate (`available_memory`; ``limit_bytes`` replaces it)."""
    if limit_bytes is None:
        limit_bytes = available_memory()
    if limit_bytes is not None and need_bytes > limit_bytes:
        raise MemoryError(
            f"{what} needs {format_bytes(need_bytes)}, more than the "
            f"{format_bytes(limit_bytes)} available; {alternatives}")


def available_memory():
    """Bytes this process can still allocate, as far as is known: the least of the system's
    ``MemAvailable``, what the cgroup's memory limit leaves (containers, where ``MemAvailable``
    shows the host) and what the address-space limit ``RLIMIT_AS`` leaves; None if none is
    known (then the dense matrix is attempted)."""
    known = []
    meminfo = _read_kb("/proc/meminfo", "MemAvailable:")
    if meminfo is not None:
        known.append(meminfo)
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2 ** 60:  # huge = unlimited
            known.append(max(limit - usage, 0))
            break
    try:
        soft = resource.getrlimit(resource.RLIMIT_AS)[0] if resource is not None else None
        if soft is not None and soft != resource.RLIM_INFINITY:
            used = _read_kb("/proc/self/status", "VmSize:")
            known.append(max(soft - (used or 0), 0))
    except (OSError, ValueError):
        pass
    return min(known) if known else None


def _read_kb(path, key):
    """The value in bytes of a ``key: N kB`` line of a /proc file, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):  # missing file, or "max" (no limit)
        return None
