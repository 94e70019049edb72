"""Command-line entry: ``python -m fused_lm info`` (also installed as ``fused-lm``)."""

from __future__ import annotations

import argparse
import platform
import sys


def info() -> int:
    import torch

    from fused_lm import __version__, _backend, _ext

    print(f"fused_lm {__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton   {triton.__version__}")
    except ImportError:
        print("triton   not installed")
    print(f"TRITON_INTERPRET={'1' if _backend.interpreter_on() else '0'}  "
          f"FUSED_LM_BACKEND={_backend.forced() or '(unset)'}")
    print("extensions:")
    for name, state in _ext.describe_extensions().items():
        print(f"  {name:8s} {state}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                  f"{p.multi_processor_count} SMs")
        devices.insert(0, "cuda")
    else:
        print("gpu: none (torch.cuda.is_available() is False)")
    for dev in devices:
        print(f"backends on {dev} (float32):")
        for op, backend in _backend.table(dev).items():
            print(f"  {op:24s} {backend}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-lm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, built extensions, GPU, backend per op")
    bench = sub.add_parser("bench", help="run the benchmark harness (same as bench/run.py)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "run.py"
    if not script.exists():
        print("bench/run.py is not found: the benchmarks live in the source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
