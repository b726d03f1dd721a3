"""SM clock, power draw and the driver's clock-limit reasons while contenders are timed.

An H100 held at its power limit lowers its clocks; a contender that does more work per second
draws more power and is slowed more. ``PowerLog`` samples ``nvidia-smi`` in the background and
summarises the samples that fall inside each timed turn, so a benchmark table can say at what
clock each contender ran and how often the power cap held it back.

    log = PowerLog.start("smi.csv")      # None where nvidia-smi is missing
    with log.window("32K/1000/3", "fwdbwd", "ours"):
        ...                              # timed calls
    log.stop()
    log.summaries()  # {(row, phase, who): {"samples", "sm_mhz", "watts", "power_capped"}}
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import shutil
import statistics
import subprocess
import time

FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
SW_POWER_CAP = 0x4  # nvmlClocksThrottleReasonSwPowerCap
HW_SLOWDOWN = 0x8 | 0x40 | 0x80  # HW slowdown, HW thermal, HW power brake


def parse_line(line: str) -> dict | None:
    """One ``--format=csv,noheader,nounits`` line of FIELDS as a dict (time in seconds since the
    epoch, host clock), or None for a line that is not one (a header, a blank, "[N/A]" fields)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 5:
        return None
    try:
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return {"t": t, "sm_mhz": float(parts[1]), "watts": float(parts[2]), "temp_c": float(parts[3]),
                "reasons": int(parts[4], 16)}
    except ValueError:
        return None


def summarise(samples: list[dict]) -> dict:
    """Medians of clock and power, and the share of samples with the power cap (or a hardware
    slowdown) active, over ``samples``."""
    if not samples:
        return {"samples": 0}
    return {
        "samples": len(samples),
        "sm_mhz": statistics.median(s["sm_mhz"] for s in samples),
        "watts": statistics.median(s["watts"] for s in samples),
        "power_capped": sum(bool(s["reasons"] & SW_POWER_CAP) for s in samples) / len(samples),
        "hw_slowdown": sum(bool(s["reasons"] & HW_SLOWDOWN) for s in samples) / len(samples),
    }


class PowerLog:
    """``nvidia-smi`` sampling every ``period_ms`` into ``path`` while the benchmark runs."""

    def __init__(self, path: str, proc: subprocess.Popen | None):
        self.path = path
        self._proc = proc
        self.windows: list[tuple[tuple, float, float]] = []

    @classmethod
    def start(cls, path: str, period_ms: int = 50) -> PowerLog | None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        out = open(path, "w")
        # stdin/stderr detached: a child holding the caller's pipes would keep a shell pipeline open.
        proc = subprocess.Popen([exe, f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", "-lms", str(period_ms)],
                                stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        out.close()
        log = cls(path, proc)
        atexit.register(log.stop)  # also when the benchmark fails half-way
        return log

    @contextlib.contextmanager
    def window(self, *key):
        t0 = time.time()
        try:
            yield
        finally:
            self.windows.append((key, t0, time.time()))

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None

    def samples(self) -> list[dict]:
        with open(self.path) as fh:
            return [s for s in map(parse_line, fh) if s is not None]

    def summaries(self) -> dict:
        """{key: summarise(samples inside every window recorded under key)}."""
        samples = self.samples()
        by_key: dict = {}
        for key, t0, t1 in self.windows:
            by_key.setdefault(key, []).extend(s for s in samples if t0 <= s["t"] <= t1)
        return {key: summarise(v) for key, v in by_key.items()}
