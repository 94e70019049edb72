"""Builds and loads the CUDA emulator: the project's CUDA kernels, compiled with g++, on the CPU.

Test-only (tests/test_cuda_emulated.py; design notes in csrc/emu/emu.cpp); setup.py never sees it.

    python csrc/emu/emulator.py [--variant default|asan]     build (cached), print the library

Translation. g++ cannot parse three CUDA constructs; copies of csrc/include and csrc/cuda (and the
emulator's own selftest.cu) are rewritten, keeping every line where it was (each copy starts
with ``#line 1 "<original path>"``, so reports name the original file and line):

  ``k<<<grid, block, smem, stream>>>(args)`` -> ``::emu::Launch<&k>{{__FILE__, __LINE__, grid,
  block, smem, stream}}(args)``; ``__shared__ T x[n];`` -> a slot placed in the block's shared
  memory (``::emu::shared``); ``extern __shared__ T x[];`` -> the launch's dynamic shared memory;
  ``__launch_bounds__(n)`` -> ``::emu::launch_bounds(n);`` at the top of the kernel body.

Build. Objects are cached under build/emu/obj by a hash of the compiler, the flags and the text of
every file the unit includes; the library under build/emu/<variant>-<hash>/ by the hash of its
objects (the 16 libraries used last are kept). The floating-point flags are the CPU extension's
(setup.py): with FMA contraction off in both, the emulated kernels round exactly as fused_lm._C
does (README "Tests"). Variants: ``default`` checks the alignment of every typed access
(-fsanitize=alignment); ``asan`` adds AddressSanitizer and UBSan and needs the ASan runtime
preloaded (``asan_preload()``).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU = ROOT / "csrc" / "emu"
BUILD = ROOT / "build" / "emu"
CXX = os.environ.get("CXX", "g++")
RUNTIME_UNITS = ("csrc/emu/emu.cpp", "csrc/emu/shims.cpp")
# object-size and pointer-overflow would triple the compile time of the optimizer kernels under
# ASan (17 s -> 67 s for adamw.cu); ASan covers out-of-object accesses.
VARIANTS = {
    "default": ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize=object-size,pointer-overflow,vptr",
             "-fno-sanitize-recover=all"],
}


# ---- translation -----------------------------------------------------------------------------

def _masked(text: str) -> str:
    """``text`` with comments and string/char literals blanked (same length, newlines kept), so
    the rewrites below only see code."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', blank, text,
                  flags=re.S)


def _close(code: str, i: int, open_: str, close: str, step: int) -> int:
    """Index of the bracket matching the one at ``i`` (scanning forward, step 1, or back, -1)."""
    depth = 0
    while 0 <= i < len(code):
        if code[i] == open_:
            depth += 1
        elif code[i] == close:
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError(f"unbalanced {open_}{close}")


def _kernel_start(code: str, end: int) -> int:
    """Start of the kernel expression (``ns::name<targs>``) ending before ``end``."""
    i = end - 1
    while code[i].isspace():
        i -= 1
    if code[i] == ">":
        i = _close(code, i, ">", "<", -1) - 1
    while i >= 0 and (code[i].isalnum() or code[i] in "_:"):
        i -= 1
    return i + 1


def _flat(s: str) -> str:
    return " ".join(s.split())


def translate(text: str, path: str) -> str:
    """The g++-compilable copy of the CUDA source ``text`` (its original path: ``path``)."""
    edits = []  # (start, end, replacement), applied from the end; line count preserved
    code = _masked(text)

    for m in re.finditer(r"<<<", code):
        start = _kernel_start(code, m.start())
        end = code.index(">>>", m.end())
        kernel, cfg = text[start:m.start()], text[m.end():end]
        new = f"::emu::Launch<&{_flat(kernel)}>{{{{__FILE__, __LINE__, {_flat(cfg)}}}}}"
        edits.append((start, end + 3, new + "\n" * text.count("\n", start, end + 3)))

    decl = re.compile(r"(?:\bstatic\s+)?(\bextern\s+)?(?:\bstatic\s+)?__shared__\s+([^;{}]*?);")
    for n, m in enumerate(decl.finditer(code)):
        d = re.fullmatch(r"(.*?)\b([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)", m.group(2), re.S)
        if not d:
            raise ValueError(f"{path}: unsupported __shared__ declaration {m.group(0)!r}")
        typ, name, dims = _flat(d.group(1)), d.group(2), _flat(d.group(3))
        align = re.search(r"\b(?:__align__|alignas)\s*\((\w+)\)", typ)
        typ = re.sub(r"\b(?:__align__|alignas)\s*\(\w+\)", "", typ).strip()
        if "," in typ or not typ:
            raise ValueError(f"{path}: one variable per __shared__ declaration: {m.group(0)!r}")
        if m.group(1):
            if dims.replace(" ", "") != "[]":
                raise ValueError(f"{path}: extern __shared__ {name} must be a T name[] array")
            new = f"{typ}* {name} = static_cast<{typ}*>(::emu::dynamic_shared());"
        else:
            slot = f"emu_slot_{n}_{name}"
            new = (f"static ::emu::SharedSlot {slot}; auto& {name} = ::emu::shared<{typ}{dims}"
                   f"{', ' + align.group(1) if align else ''}>({slot}, __FILE__, __LINE__);")
        edits.append((m.start(), m.end(), new + "\n" * m.group(0).count("\n")))

    for m in re.finditer(r"__launch_bounds__\s*\(", code):
        close = _close(code, m.end() - 1, "(", ")", 1)
        args = _flat(text[m.end():close])
        edits.append((m.start(), close + 1, "\n" * text.count("\n", m.start(), close + 1)))
        depth, i = 0, close + 1
        while i < len(code) and not (depth == 0 and code[i] in "{;"):
            depth += (code[i] == "(") - (code[i] == ")")
            i += 1
        if i < len(code) and code[i] == "{":   # a definition: check the bounds on entry
            edits.append((i + 1, i + 1, f" ::emu::launch_bounds({args});"))

    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return f'#line 1 "{path}"\n' + text


# ---- build -----------------------------------------------------------------------------------

def _sources() -> dict[str, str]:
    """Relative path -> text of every file the emulated build translates."""
    files = [p for d in ("csrc/include", "csrc/cuda") for p in (ROOT / d).rglob("*")
             if p.suffix in (".h", ".cuh", ".cu")]
    files.append(EMU / "selftest.cu")
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(files)}


@functools.lru_cache(None)
def _cpu_fp_flags() -> tuple[str, ...]:
    return tuple(cpu_fp_flags())


def extensions(cuda: bool = True) -> list:
    """setup.py's extensions (``cuda=False``: as with FUSED_LM_SKIP_CUDA_BUILD=1)."""
    spec = importlib.util.spec_from_file_location("fused_lm_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    saved = os.environ.get("FUSED_LM_SKIP_CUDA_BUILD")
    if not cuda:
        os.environ["FUSED_LM_SKIP_CUDA_BUILD"] = "1"
    try:
        return setup.extensions()
    finally:
        if saved is None:
            os.environ.pop("FUSED_LM_SKIP_CUDA_BUILD", None)
        else:
            os.environ["FUSED_LM_SKIP_CUDA_BUILD"] = saved


def cpu_fp_flags() -> list[str]:
    """The floating-point flags of the CPU extension fused_lm._C (setup.py): target (-march=native:
    FMA), contraction, math options. Not its -O3: without -ffast-math the optimisation level does
    not change IEEE results once contraction is off, and -O1 compiles twice as fast."""
    (ext,) = [e for e in extensions(cuda=False) if e.name == "fused_lm._C"]
    flags = ext.extra_compile_args
    flags = flags["cxx"] if isinstance(flags, dict) else flags
    return [f for f in flags if re.match(r"-m|-ffp-contract|-f(no-)?[\w-]*math", f)]


def _includes(path: Path, text: str, dirs: list[Path], seen: dict[Path, str]) -> None:
    """Adds ``path`` and every file it includes by ``#include "x"`` or <cuda_runtime.h> (found
    next to the includer or in ``dirs``) to ``seen``."""
    seen[path] = text
    for name in re.findall(r'^\s*#\s*include\s*["<]([^">]+)[">]', text, re.M):
        for d in [path.parent, *dirs]:
            p = d / name
            if p.is_file():
                if p not in seen:
                    _includes(p, p.read_text(), dirs, seen)
                break


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(None)
def _compiler() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


def build(variant: str = "default", mutations=(), units=None, fp_flags=None) -> Path:
    """Builds (or finds in the cache) the emulator library and returns its path.

    mutations: (path, old, new) text substitutions applied to the sources before translation
    (``old`` must occur); units: the CUDA sources to compile (default: every .cu file)."""
    sources = _sources()
    for path, old, new in mutations:
        if old not in sources[path]:
            raise ValueError(f"mutation target not found in {path}: {old!r}")
        sources[path] = sources[path].replace(old, new)
    units = sorted(p for p in sources if p.endswith(".cu")) if units is None else list(units)
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".lock", "w") as lock, tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tree = Path(tmp)
        flags = ["-std=c++17", "-O1", "-fPIC", "-g1", "-fno-omit-frame-pointer",
                 "-fvisibility=hidden", "-D__CUDACC__", "-D__CUDA_ARCH__=900",
                 f"-I{tree / 'csrc/include'}", f"-I{EMU}",
                 "-include", "cuda_runtime.h",          # as nvcc does for every .cu file
                 f"-fdebug-prefix-map={tree}={ROOT}",   # debug info names the original files
                 *(_cpu_fp_flags() if fp_flags is None else fp_flags), *VARIANTS[variant]]
        for rel, text in sources.items():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_text(translate(text, rel))
        jobs = []
        for rel in [*RUNTIME_UNITS, *units]:
            src = (ROOT if rel in RUNTIME_UNITS else tree) / rel
            deps: dict[Path, str] = {}
            _includes(src, src.read_text(), [tree / "csrc/include", EMU], deps)
            # The key names no path of the tree: a mutated tree shares the untouched objects.
            key = _digest(_compiler(), [f.replace(tmp, "") for f in flags],
                          *sorted((p.name, t) for p, t in deps.items()))
            jobs.append((src, BUILD / "obj" / f"{src.stem}-{key}.o"))
        lib = BUILD / f"{variant}-{_digest(*(o.name for _, o in jobs))}" / "libemu.so"
        if not lib.exists():
            (BUILD / "obj").mkdir(exist_ok=True)

            def compile_(job):
                src, obj = job
                if not obj.exists():
                    _run([CXX, *flags, "-x", "c++", "-c", str(src), "-o", str(obj) + ".tmp"])
                    os.replace(str(obj) + ".tmp", obj)

            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                list(pool.map(compile_, jobs))
            lib.parent.mkdir(parents=True, exist_ok=True)
            _run([CXX, "-shared", "-o", f"{lib}.tmp", *(str(o) for _, o in jobs),
                  *VARIANTS[variant]])
            (lib.parent / "objects").write_text("\n".join(o.name for _, o in jobs))
            os.replace(f"{lib}.tmp", lib)
        os.utime(lib)
        _prune()
        return lib


def _prune(keep: int = 16) -> None:
    """Keeps the ``keep`` libraries used last and the objects they are made of."""
    libs = sorted(BUILD.glob("*-*/libemu.so"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in libs[keep:]:
        shutil.rmtree(old.parent)
    used = {n for lib in libs[:keep] for n in (lib.parent / "objects").read_text().split()}
    for obj in (BUILD / "obj").glob("*.o"):
        if obj.name not in used:
            obj.unlink()


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"emulator build failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")


def asan_preload() -> str:
    """The ASan runtime to LD_PRELOAD into a process that loads the ``asan`` variant."""
    return subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True,
                          check=True).stdout.strip()


# ---- loading ---------------------------------------------------------------------------------

class EmulatorError(RuntimeError):
    """A launch the emulator failed (configuration, synchronisation): the CUDA error code and the
    emulator's report."""

    def __init__(self, code: int, report: str):
        super().__init__(f"CUDA error {code}:\n{report}")
        self.code, self.report = code, report


class Emulator:
    """The loaded library: ``call(name, argtypes, *args)`` runs an extern "C" entry point that
    returns a CUDA error code and raises EmulatorError (with the report) unless it is 0."""

    def __init__(self, path: Path | str):
        self.path = str(path)
        self.lib = ctypes.CDLL(self.path)
        self.lib.emu_take_report.restype = ctypes.c_char_p
        self.lib.emu_set_shuffle.argtypes = [ctypes.c_uint64]
        self.lib.emu_device_alloc.restype = ctypes.c_void_p
        self.lib.emu_device_alloc.argtypes = [ctypes.c_size_t]
        self.lib.emu_device_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def call(self, name: str, argtypes: list, *args) -> None:
        fn = getattr(self.lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        code = fn(*args)
        report = self.take_report()
        if code == -1:
            raise EmulatorError(code, f"{name}: its launcher is not in {self.path}")
        if code or report:
            raise EmulatorError(code, report)

    def take_report(self) -> str:
        return self.lib.emu_take_report().decode()

    def set_shuffle(self, seed: int) -> None:
        self.lib.emu_set_shuffle(seed)

    def stats(self) -> tuple[int, int, int]:
        """(launches, blocks, thread resumptions) since the library was loaded."""
        out = (ctypes.c_uint64 * 3)()
        self.lib.emu_stats(out)
        return tuple(out)

    def device_alloc(self, nbytes: int) -> int:
        p = self.lib.emu_device_alloc(nbytes)
        if not p:
            raise MemoryError(f"emu_device_alloc({nbytes}) failed")
        return p

    def device_free(self, ptr: int, nbytes: int) -> None:
        self.lib.emu_device_free(ptr, nbytes)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    print(build(ap.parse_args().variant))
