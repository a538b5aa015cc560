#!/usr/bin/env python3
"""Compiles the hand-written kernels in cuda/ with NVRTC (through ctypes) for the given GPU
architectures, with no GPU and no nvcc: the NVRTC and runtime-header wheels from PyPI suffice
(see /work/shared/DATA.md). Prints each kernel's registers and spills (from the cubin's
resource usage as NVRTC's -Xptxas -v log reports it) and fails on any error or warning.

Usage: scripts/nvrtc-compile-kernels.py --cuda-root DIR [--arch sm_80 --arch sm_90] [FILES...]
DIR holds lib/libnvrtc.so.* and include/cuda_bf16.h (e.g. .../site-packages/nvidia/cu13).
This is the kernel author's local check; scripts/check-kernels (the infra's) is the CI one.
"""
import argparse, ctypes, glob, os, sys

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda-root", required=True)
    ap.add_argument("--arch", action="append")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    archs = a.arch or ["sm_80", "sm_90"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = a.files or [os.path.join(repo, "cuda", f) for f in
                        ("layernorm.cu", "attention.cu", "cross_entropy.cu", "conv.cu", "reduce.cu")]
    lib = glob.glob(os.path.join(a.cuda_root, "lib", "libnvrtc.so*"))
    lib = [l for l in lib if "builtins" not in l]
    nv = ctypes.CDLL(sorted(lib)[0])
    nv.nvrtcGetErrorString.restype = ctypes.c_char_p
    failed = False
    for path in files:
        src = open(path, "rb").read()
        for arch in archs:
            prog = ctypes.c_void_p()
            rc = nv.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None)
            assert rc == 0, nv.nvrtcGetErrorString(rc)
            opts = [f"--gpu-architecture={arch}", "-I" + os.path.join(a.cuda_root, "include"),
                    "-I" + os.path.join(repo, "cuda"), "--std=c++17", "-Xptxas", "-v", "-Xptxas", "-warn-spills",
                    "-Xptxas", "-warn-lmem-usage"]
            arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
            rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            nv.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            bad = rc != 0 or "warning" in log.lower() or "spill stores" in log and " 0 bytes spill stores" not in log
            # Every "N bytes spill stores" line must say 0.
            for line in log.splitlines():
                if "spill" in line and not ("0 bytes spill stores, 0 bytes spill loads" in line):
                    bad = True
            cubin = ctypes.c_size_t()
            if rc == 0:
                nv.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
            print(f"{'FAIL' if bad else 'ok  '} {os.path.basename(path)} {arch}: cubin {cubin.value} bytes")
            if bad or os.environ.get("VERBOSE"):
                print(log)
            failed |= bad
            nv.nvrtcDestroyProgram(ctypes.byref(prog))
    sys.exit(1 if failed else 0)

main()
