"""Compile every guarded-attention kernel for an H100 (sm_90a) on a machine with no GPU.

The CPU tests run the kernels through Triton's interpreter, which never meets the real
code generator: ints equal to 1 specialised into constants, branches whose values must
unify, TMA descriptors, tensor-core dots, ptxas. This script sends each launch of a real
call (forward, backward, decode) through a stand-in CUDA driver that names an sm_90 target
and compiles instead of launching (Triton's ``warmup``), so each specialisation a call
makes is compiled as it would be on an H100. Outputs are garbage: nothing runs.

Run it in a process without ``TRITON_INTERPRET`` (``tests/test_kernels_compile.py`` does):

    python tests/sm90_compile.py [--json FILE]

It prints one line per compiled kernel: the call, the kernel, registers and spill bytes
(from ptxas, where its log can be had), and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sm90_compile: run without TRITON_INTERPRET (it compiles for a GPU target)")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = GPUTarget("cuda", 90, 32)


class _Hopper(CudaDriver):
    """The parts of the CUDA driver a compile-only launch asks for, with no device behind them."""

    def __init__(self) -> None:  # the real one loads libcuda
        pass

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


def _ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes of a PTX module as ptxas reports them ({} if it cannot say)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(TARGET.arch).path
    except Exception:  # an older Triton: report nothing rather than guess
        return {}
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "k.ptx")
        src.write_text(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{TARGET.arch}a", str(src), "-o", str(Path(d, "k.cubin"))],
                             capture_output=True, text=True).stderr
    out = {}
    for key, pattern in (("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads")):
        m = re.search(pattern, log)
        if m:
            out[key] = int(m.group(1))
    return out


def _install(records: list, call: list) -> None:
    """Turn ``kernel[grid](...)`` into a compile for TARGET, recording what was compiled."""

    def getitem(self, grid):
        def compile_only(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            records.append({"call": call[0], "kernel": self.fn.__name__, **_ptxas_usage(kernel.asm["ptx"])})
            print(json.dumps(records[-1]), flush=True)
            return kernel

        return compile_only

    driver.set_active(_Hopper())
    JITFunction.__getitem__ = getitem


def _calls():
    """(label, thunk) for each call whose kernels get compiled: the shapes and dtypes the product
    supports (head dims 64 and 128; bf16, fp16, fp32; GQA; a policy with window and global-token
    patterns), forward with backward (16-bit forwards and 128-query dq through the Gluon kernels, and
    once each through the Triton ones that other GPUs run), and decode."""
    import domainguard as dg
    import dataclasses

    from domainguard.attention import GuardedAttention, KernelConfig, default_config

    plain = dg.compile(dg.load_policy(REPO / "policies" / "prompt_injection.yaml"))
    patterned = dg.compile(dg.load_policy(REPO / "policies" / "clinical.yaml"))

    def train(compiled, dtype, hd, hq, hkv, n=300, config=None):
        def go():
            ids = torch.randint(0, compiled.num_domains, (1, n), generator=torch.Generator().manual_seed(hd + hq))
            layout = dg.Layout.from_ids(compiled, ids)
            q, k, v = (torch.randn(1, h, n, hd, dtype=dtype, requires_grad=True) for h in (hq, hkv, hkv))
            out = GuardedAttention(compiled, config)(q, k, v, layout, 0, backend="triton")
            out.float().sum().backward()
        return go

    def decode(compiled, dtype, hd, hq, hkv, n=300, new=2):
        def go():
            ids = torch.randint(0, compiled.num_domains, (1, n), generator=torch.Generator().manual_seed(7))
            layout = dg.Layout.from_ids(compiled, ids)
            q = torch.randn(1, hq, new, hd, dtype=dtype)
            k, v = (torch.randn(1, hkv, n, hd, dtype=dtype) for _ in range(2))
            with torch.no_grad():
                GuardedAttention(compiled)(q, k, v, layout, 0, q_slice=new, backend="triton")
        return go

    return [
        ("bf16 d128 MHA", train(plain, torch.bfloat16, 128, 2, 2)),
        ("bf16 d128 MHA, Triton forward",
         train(plain, torch.bfloat16, 128, 2, 2, config=KernelConfig(fwd_gluon=False))),
        # dk/dv's FULL runs in 64-row steps at a pipeline depth of their own (KernelConfig.dkdv FULL_M, FULL_STAGES)
        ("bf16 d128 MHA, dk/dv FULL_M 64",
         train(plain, torch.bfloat16, 128, 2, 2, config=KernelConfig(dkdv=KernelConfig().dkdv + (
             ("FULL_M", 64), ("FULL_STAGES", 2))))),
        # the Triton dq in 128-query programs (what other GPUs run with the bf16 d128 default)
        ("bf16 d128 MHA, Triton dq",
         train(plain, torch.bfloat16, 128, 2, 2, config=dataclasses.replace(default_config(torch.bfloat16, 128),
                                                                            dq_gluon=False))),
        ("fp16 d64 GQA 4:1, patterns", train(patterned, torch.float16, 64, 4, 1)),
        # the Gluon dq at head dim 64 (taken with 128-query dq programs)
        ("fp16 d64 GQA 4:1, patterns, Gluon dq",
         train(patterned, torch.float16, 64, 4, 1, config=KernelConfig(dq=(("SUB_M", 128), ("SUB_N", 64),
                                                                            ("num_warps", 8), ("num_stages", 3))))),
        ("fp32 d64 GQA 2:1", train(plain, torch.float32, 64, 2, 1)),
        ("fp32 d128 MHA", train(plain, torch.float32, 128, 2, 2)),
        ("decode bf16 d128 GQA 3:1, patterns", decode(patterned, torch.bfloat16, 128, 3, 1)),  # 2 splits
        ("decode fp16 d64 MHA, one query, one split", decode(plain, torch.float16, 64, 2, 2, n=100, new=1)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="also write the records to this file")
    args = ap.parse_args(argv)
    records, call = [], [None]
    _install(records, call)
    for label, go in _calls():
        call[0] = label
        go()
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
