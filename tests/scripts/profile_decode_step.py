"""Kernel time of one decoding step from CubeCL's per-launch profile log (CUBECL_DEBUG_OPTION=profile writes a
line "| 12.3µs     | KernelName" per launch): the sums of a longer run minus those of a shorter one (same model,
prompt and prefill), over the steps between them, by kernel. Steps are counted by the argmax's final pass (one
launch a step) rather than taken from the runs' lengths: the log may end before a run's last launches.

    python3 profile_decode_step.py SHORT.log LONG.log
"""
import collections
import re
import sys

UNIT_US = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
LINE = re.compile(r"\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+)")


def launches(path):
    total_us, count = collections.defaultdict(float), collections.Counter()
    with open(path, errors="replace") as log:
        for line in log:
            m = LINE.match(line)
            if m:
                name = re.sub(r"\s+", " ", m.group(3).strip())[:150]
                total_us[name] += float(m.group(1)) * UNIT_US[m.group(2)]
                count[name] += 1
    return total_us, count


def main():
    (short_us, short_n), (long_us, long_n) = launches(sys.argv[1]), launches(sys.argv[2])
    steps = sum(n for k, n in long_n.items() if k.startswith("ArgmaxFinalKernel")) - sum(
        n for k, n in short_n.items() if k.startswith("ArgmaxFinalKernel")
    )
    if steps <= 0:
        sys.exit("no decoding steps between the two logs (no ArgmaxFinalKernel launches): was profiling on?")
    per_us = {k: (long_us[k] - short_us.get(k, 0.0)) / steps for k in long_us}
    per_n = {k: (long_n[k] - short_n.get(k, 0)) / steps for k in long_n}
    print(f"{steps} steps; per step: {sum(per_n.values()):.0f} launches, {sum(per_us.values()) / 1e3:.3f} ms of kernel time")
    for name, us in sorted(per_us.items(), key=lambda kv: -kv[1]):
        if per_n[name] > 0:
            print(f"{us:9.1f} us {per_n[name]:6.1f} x {us / per_n[name]:7.2f} us  {name}")


if __name__ == "__main__":
    main()
