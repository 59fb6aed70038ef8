"""Which instruction sets (and which GPU backend) the embedded llama-server is compiled for, chosen on purpose.

`-march=native` is not safe: on a virtual machine whose CPU advertises AMX (cloud Xeons from Sapphire Rapids on),
it compiles ggml's AMX paths in and the server dies with SIGILL at its first matrix product (`tileloadd`), because
the hypervisor does not let the guest use the AMX tile state it advertises. So the set is read from the CPU's
flags, AMX is always left out, and every choice is recorded so that a figure can name the build that made it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# ggml's x86 options, in order, with the /proc/cpuinfo flags each one needs (all of them).
X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SSE42", ("sse4_2",)),
    ("AVX", ("avx",)),
    ("F16C", ("f16c",)),
    ("FMA", ("fma",)),
    ("BMI2", ("bmi2",)),
    ("AVX2", ("avx2",)),
    ("AVX_VNNI", ("avx_vnni",)),
    ("AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("AVX512_VBMI", ("avx512f", "avx512vbmi")),
    ("AVX512_VNNI", ("avx512f", "avx512_vnni")),
    ("AVX512_BF16", ("avx512f", "avx512_bf16")),
)
# Advertised inside virtual machines that then fault on them (tileloadd raises SIGILL without the guest's
# XFEATURE permission, and requesting it turns the SIGILL into a segfault): never compiled in.
NEVER_OPTIONS = {"AMX_TILE": "amx_tile", "AMX_INT8": "amx_int8", "AMX_BF16": "amx_bf16"}
# The fallback when the chosen set dies in the smoke test: what every x86-64 CPU of the last ten years runs.
CONSERVATIVE_OPTIONS = ("SSE42", "AVX", "F16C", "FMA", "BMI2", "AVX2")
BASE_CMAKE_ARGS = (
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
)
# The programs the build makes (every other llama.cpp program is left out of `all` by only_targets.cmake): the
# server kvbatch runs, and the tools it calls or a user of it reaches for (token counts, speed, the memory fit).
SERVER_PROGRAMS = ("llama-server", "llama-tokenize", "llama-bench", "llama-batched-bench", "llama-fit-params")
ONLY_TARGETS_SCRIPT = Path(__file__).with_name("only_targets.cmake")
"""Given to CMake as CMAKE_PROJECT_INCLUDE; its text is part of the wheel key (a changed script is another build)."""
# A C++ compiler of ggml's larger files holds up to about 450 MB here; nvcc with device code up to about 2 GB.
CPU_COMPILE_BYTES = 1 << 30
CUDA_COMPILE_BYTES = 2 << 30


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The `flags` of the first processor in /proc/cpuinfo (or of the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    match = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    return set(match.group(1).split()) if match else set()


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    match = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    return match.group(1).strip() if match else "unknown"


@dataclass(frozen=True)
class CudaTarget:
    """A CUDA build for the cards found, limited to their architectures (all of them would take an hour)."""

    architectures: tuple[str, ...]
    nvcc: str

    def cmake_args(self) -> list[str]:
        return ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(self.architectures)}"]


@dataclass(frozen=True)
class BuildChoice:
    """The instruction sets and backend of one build, with the reasons for what was left out."""

    options: tuple[str, ...]
    left_out: dict[str, str] = field(default_factory=dict)
    cuda: CudaTarget | None = None
    conservative: bool = False
    extra_cmake_args: tuple[str, ...] = ()

    @property
    def backend(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def cmake_args(self) -> list[str]:
        chosen = set(self.options)
        args = list(BASE_CMAKE_ARGS) + [f"-DKVBATCH_ONLY_TARGETS={';'.join(SERVER_PROGRAMS)}"]
        args += [f"-DGGML_{name}={'ON' if name in chosen else 'OFF'}" for name, _ in X86_OPTIONS]
        args += [f"-DGGML_{name}=OFF" for name in NEVER_OPTIONS]
        if self.cuda:
            args += self.cuda.cmake_args()
        return args + list(self.extra_cmake_args)

    def key(self, package_version: str) -> str:
        """Names the wheel built with exactly these arguments: a changed flag set never reuses another's wheel."""
        script = hashlib.sha256(ONLY_TARGETS_SCRIPT.read_bytes()).hexdigest()
        digest = hashlib.sha256(" ".join([package_version, *self.cmake_args(), script]).encode()).hexdigest()[:12]
        return f"{package_version}-{self.backend}-{digest}"

    def build_cmake_args(self) -> list[str]:
        """The arguments the build runs with: these, and the script that leaves other programs out (by path, which
        differs between clones, so it is not part of the key; its text is)."""
        return [*self.cmake_args(), f"-DCMAKE_PROJECT_INCLUDE={ONLY_TARGETS_SCRIPT}"]

    def describe(self) -> str:
        text = " ".join(self.options) or "baseline x86-64 only"
        if self.cuda:
            text += f" + CUDA (sm {', '.join(self.cuda.architectures)})"
        return text


def choose_cpu_options(flags: set[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """Every ggml x86 option whose CPU flags are all present, except those known to fault in virtual machines."""
    chosen = tuple(name for name, needs in X86_OPTIONS if all(flag in flags for flag in needs))
    left_out = {
        name: f"the CPU does not advertise {', '.join(f for f in needs if f not in flags)}"
        for name, needs in X86_OPTIONS
        if name not in chosen
    }
    for name, flag in NEVER_OPTIONS.items():
        if flag in flags:
            left_out[name] = "advertised, but faults (SIGILL) in virtual machines: never compiled in"
    return chosen, left_out


def conservative(choice: BuildChoice) -> BuildChoice:
    """The AVX2-class set (or less, where the CPU lacks part of it), for a rebuild after a crashed smoke test."""
    options = tuple(name for name in CONSERVATIVE_OPTIONS if name in choice.options)
    left_out = dict(choice.left_out)
    for name in choice.options:
        if name not in options:
            left_out[name] = "left out by the conservative rebuild after the first build crashed"
    return BuildChoice(options, left_out, choice.cuda, True, choice.extra_cmake_args)


def find_cuda_target(backend: str = "auto") -> tuple[CudaTarget | None, str]:
    """A CUDA target when `nvcc` exists and an NVIDIA GPU answers; else None, with the reason in words."""
    if backend == "cpu":
        return None, "CPU build (asked for)"
    nvcc = shutil.which("nvcc") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc",) if p.exists()), None
    )
    capabilities = _gpu_compute_capabilities()
    if nvcc and capabilities:
        architectures = tuple(sorted({c.replace(".", "") for c in capabilities}))
        return CudaTarget(architectures, nvcc), f"CUDA build for sm {', '.join(architectures)} (nvcc {nvcc})"
    if backend == "cuda":
        missing = "nvcc" if not nvcc else "an NVIDIA GPU (nvidia-smi lists none)"
        raise RuntimeError(f"a CUDA build was asked for, but this machine has no {missing}")
    if nvcc:
        return None, "CPU build: nvcc is installed but no NVIDIA GPU answers (nvidia-smi)"
    return None, "CPU build: no nvcc" + ("" if not capabilities else ", although a GPU is present")


def _gpu_compute_capabilities() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())]


def build_jobs(cuda: bool, *, cpus: int | None = None, available_bytes: int | None = None) -> int:
    """Compilers to run at once: no more than the cores, and no more than memory allows (cmake's bare `-j` started
    dozens on 2 cores, load average above 30)."""
    import psutil

    cpus = cpus or len(os.sched_getaffinity(0))
    available = available_bytes if available_bytes is not None else psutil.virtual_memory().available
    per_job = CUDA_COMPILE_BYTES if cuda else CPU_COMPILE_BYTES
    return max(1, min(cpus, available // per_job))


def choose_build(cpuinfo: str | None = None, *, backend: str = "auto", extra_cmake_args: tuple[str, ...] = ()):
    """The build for this machine: its CPU's safe instruction sets, plus CUDA where a GPU and nvcc are present."""
    options, left_out = choose_cpu_options(cpu_flags(cpuinfo))
    cuda, cuda_reason = find_cuda_target(backend)
    return BuildChoice(options, left_out, cuda, False, extra_cmake_args), cuda_reason
