"""The CPU the benchmarks ran on, for their table headers: a ratio holds only for that CPU."""


def cpu_model():
    """'<model name> (family F, model M)' from /proc/cpuinfo."""
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
