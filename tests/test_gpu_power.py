"""benchmarks/gpu_power.py: nvidia-smi samples are parsed, bad lines dropped, and each timed turn
gets the samples inside it only (no GPU or nvidia-smi needed)."""

import datetime
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_power  # noqa: E402


def _line(t: float, mhz: int, watts: float, reasons: int) -> str:
    stamp = datetime.datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    return f"{stamp}, {mhz}, {watts:.2f}, 55, 0x{reasons:016x}\n"


def test_parse_line_reads_fields_and_refuses_other_lines():
    s = gpu_power.parse_line("2026/11/24 14:32:40.576, 1650, 645.12, 53, 0x0000000000000004")
    assert (s["sm_mhz"], s["watts"], s["temp_c"], s["reasons"]) == (1650.0, 645.12, 53.0, 4)
    assert s["t"] == datetime.datetime(2026, 11, 24, 14, 32, 40, 576000).timestamp()
    for bad in ("", "timestamp, clocks.current.sm [MHz], power.draw [W], temperature.gpu, reasons",
                "2026/11/24 14:32:40.576, [N/A], 645.12, 53, 0x4", "2026/11/24 14:32:40.576, 1650, 645.12, 53"):
        assert gpu_power.parse_line(bad) is None


def test_summaries_take_each_turns_samples_only(tmp_path):
    t0 = 1_800_000_000.0
    lines = [_line(t0 + 0.1 * i, 1980, 300.0, 0) for i in range(10)]  # before any turn
    lines += [_line(t0 + 1.0 + 0.1 * i, 1650 + 10 * (i % 2), 700.0, 0x4) for i in range(10)]  # "ours": capped
    lines += ["garbage line\n"]
    lines += [_line(t0 + 3.0 + 0.1 * i, 1900, 650.0, 0x4 if i < 2 else 0) for i in range(10)]  # "flex"
    path = tmp_path / "smi.csv"
    path.write_text("".join(lines))
    log = gpu_power.PowerLog(str(path), None)
    log.windows += [(("32K", "fwdbwd", "ours"), t0 + 0.95, t0 + 1.95), (("32K", "fwdbwd", "flex"), t0 + 2.95, t0 + 3.95),
                    (("32K", "fwdbwd", "sdpa"), t0 + 5.0, t0 + 6.0)]
    got = log.summaries()
    ours, flex = got[("32K", "fwdbwd", "ours")], got[("32K", "fwdbwd", "flex")]
    assert ours["samples"] == 10 and ours["power_capped"] == 1.0 and ours["sm_mhz"] == pytest.approx(1655.0)
    assert ours["watts"] == 700.0 and ours["hw_slowdown"] == 0.0
    assert flex["samples"] == 10 and flex["power_capped"] == pytest.approx(0.2) and flex["sm_mhz"] == 1900.0
    assert got[("32K", "fwdbwd", "sdpa")] == {"samples": 0}


def test_turns_of_one_contender_are_pooled(tmp_path):
    t0 = 1_800_000_000.0
    path = tmp_path / "smi.csv"
    path.write_text("".join(_line(t0 + i, 1500 + 100 * i, 500.0, 0x8 if i == 3 else 0) for i in range(4)))
    log = gpu_power.PowerLog(str(path), None)
    log.windows += [(("k", "fwd", "ours"), t0 - 0.5, t0 + 0.5), (("k", "fwd", "ours"), t0 + 2.5, t0 + 3.5)]
    s = log.summaries()[("k", "fwd", "ours")]
    assert s["samples"] == 2 and s["sm_mhz"] == pytest.approx((1500 + 1800) / 2) and s["hw_slowdown"] == 0.5


def test_start_without_nvidia_smi_gives_none(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_power.shutil, "which", lambda name: None)
    assert gpu_power.PowerLog.start(str(tmp_path / "x.csv")) is None
    assert not (tmp_path / "x.csv").exists()
