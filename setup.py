"""Build the compiled extensions of fused_lm.

* ``fused_lm._C``       C++ for the CPU (OpenMP, -O3, vectorised); always built.
* ``fused_lm._C_cuda``  CUDA C++ kernels; built whenever ``nvcc`` is found, even on a machine
                        without a GPU, for the archs in ``FUSED_LM_CUDA_ARCHS`` (default "80;90").

The .cu files include no torch header: they export plain launch functions taking raw pointers and
a ``cudaStream_t`` that Python passes in (``torch.cuda.current_stream().cuda_stream``). The
bindings (``csrc/cuda/*.cpp``) include torch's CPU-side headers only. So the same sources build
against the CPU wheel of torch (which lacks ``c10/cuda`` and ``cusparse.h``) and against a CUDA
wheel. cudart is linked statically, so importing ``_C_cuda`` needs no CUDA library on the machine.

Environment:
  FUSED_LM_CUDA_ARCHS       ";"-separated compute capabilities, e.g. "80;90" (default) or "90a"
  FUSED_LM_SKIP_CUDA_BUILD  "1" skips the CUDA extension
  MAX_JOBS                  parallel compile jobs (default: from cores and free memory)
  CUDA_HOME                 the CUDA toolkit (default: where nvcc is)
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _max_jobs() -> str:
    """One job per core, but no more than one per 2 GiB of available memory (nvcc peaks near
    1.5 GiB per translation unit of templated kernels)."""
    if os.environ.get("MAX_JOBS"):
        return os.environ["MAX_JOBS"]
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail_gib = int(info["MemAvailable"].split()[0]) / (1 << 20)
    except (OSError, KeyError, ValueError):
        avail_gib = 2.0 * cores
    return str(max(1, min(cores, int(avail_gib // 2))))


def _cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, else the toolkit of the nvcc on PATH (which may be a
    wrapper script), else /usr/local/cuda. None when there is no usable toolkit."""
    if os.environ.get("FUSED_LM_SKIP_CUDA_BUILD") == "1":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


# Where toolkits put their libraries: lib64 (runfile and most distribution packages), lib (pip and
# conda layouts, some containers), targets/<triple>/lib (the real directory that lib64 links to in
# the runfile layout; sbsa for Grace/ARM servers), lib/x64 (Windows-style trees).
_CUDART_SUBDIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib",
                   "targets/aarch64-linux/lib", "lib/x64")


def _cudart_static_dir(cuda_home: str) -> str:
    """The directory of ``libcudart_static.a`` under ``cuda_home`` (static cudart is what lets the
    extension import with no CUDA runtime installed); a clear error when the toolkit has none."""
    looked = []
    for sub in _CUDART_SUBDIRS:
        d = os.path.join(cuda_home, sub)
        looked.append(d)
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return d
    raise SystemExit(
        "error: building fused_lm._C_cuda needs the static CUDA runtime libcudart_static.a, which "
        f"is not in the toolkit at {cuda_home} (looked in: {', '.join(looked)}). Point CUDA_HOME at "
        "a full CUDA toolkit (the one nvcc belongs to), or set FUSED_LM_SKIP_CUDA_BUILD=1 to build "
        "the CPU extension only.")


def _archs():
    archs = os.environ.get("FUSED_LM_CUDA_ARCHS", "80;90")
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


def _archs_string():
    return "_".join(_archs())  # a macro-safe token, stringified in module_cuda.cpp


def _gencode_flags():
    archs = _archs()
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX of the newest arch too, so newer GPUs can JIT it.
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    from torch.utils.cpp_extension import CppExtension

    include = [os.path.join(ROOT, "csrc", "include")]
    # -ffp-contract=off: no implicit multiply-add fusion (GCC fuses by default in C++, nvcc too,
    # differently): the functors write fma_rn where they mean one, so the CPU and CUDA builds
    # compute the same bits (csrc/include/fused_lm/optim.h; cost measured in README).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-DFUSED_LM_CPU"]
    if os.environ.get("FUSED_LM_CPU_NATIVE", "1") == "1":
        cxx_flags.append("-march=native")  # built from source on the machine that runs it
    exts = [
        CppExtension(
            "fused_lm._C",
            sources=_rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
            include_dirs=include,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    cuda_home = _cuda_home()
    if cuda_home is not None:
        # torch reads CUDA_HOME when cpp_extension is imported; set it for both cases.
        os.environ["CUDA_HOME"] = cuda_home
        import torch.utils.cpp_extension as cpp_ext

        cpp_ext.CUDA_HOME = cuda_home
        sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
        sources += glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
        cudart_dir = _cudart_static_dir(cuda_home)
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false",
                      "-Xptxas=-v" if os.environ.get("FUSED_LM_PTXAS_VERBOSE") else "-Xptxas=-O3"]
        exts.append(
            CppExtension(
                "fused_lm._C_cuda",
                sources=_rel(sources),
                include_dirs=include + [os.path.join(cuda_home, "include")],
                library_dirs=[cudart_dir],
                # Static cudart: the extension imports on machines with no CUDA runtime installed.
                libraries=["cudart_static", "rt", "dl", "pthread"],
                extra_compile_args={"cxx": ["-O3", "-DFUSED_LM_CUDA",
                                        f"-DFUSED_LM_ARCHS={_archs_string()}"],
                                    "nvcc": nvcc_flags + _gencode_flags()},
            )
        )
    return exts


def main():
    from torch.utils.cpp_extension import BuildExtension

    os.environ["MAX_JOBS"] = _max_jobs()
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
