"""Memory probes: the best available is picked and named; a forced one that cannot run says why."""

from __future__ import annotations

import pytest
from kvbatch.errors import UserInputError
from kvbatch.probes import NvmlDeviceProbe, NvmlProcessProbe, ProcessRssProbe, nvml_available, pick_probe
from ollama_double import MODEL


def test_cpu_machine_picks_the_server_rss_and_the_log_is_exact(embedded_server):
    if nvml_available():
        pytest.skip("this machine has a GPU: the NVML test below covers it")
    probe = pick_probe(None, pid=embedded_server.pid, log_text=embedded_server.log_text)
    assert probe.name == "process-rss"
    assert probe.read() > 200 * 2**20  # the model's weights alone are 253 MB on disk
    log_probe = pick_probe("server-log-kv", pid=embedded_server.pid, log_text=embedded_server.log_text)
    assert log_probe.reading().bytes == 54 * 2**20 and log_probe.reading().probe == "server-log-kv"


def test_ollama_probe_reads_api_ps(ollama_double):
    probe = pick_probe("ollama-ps", ollama_url=ollama_double.url, ollama_model=MODEL)
    assert probe.read() == 600_000_000 + 3 * 1024 * 4096


def test_unknown_or_impossible_probes_say_why():
    with pytest.raises(UserInputError, match="known probes: auto, nvml-device, nvml-process, process-rss"):
        pick_probe("magic", pid=1)
    with pytest.raises(UserInputError, match="cannot run here"):
        pick_probe("ollama-ps", pid=1)


@pytest.mark.gpu
def test_nvml_probes_on_a_gpu_server():
    """Opt-in (KVBATCH_GPU_TESTS=1) on a machine with an NVIDIA GPU and a CUDA build of llama-server."""
    from kvbatch.serve.server import EmbeddedServer, ServerConfig

    device = NvmlDeviceProbe()
    before = device.read()
    with EmbeddedServer(ServerConfig(context_tokens=32768, extra_args=["--n-gpu-layers", "99"])) as server:
        assert pick_probe(None, pid=server.pid).name == "nvml-device"
        held = NvmlProcessProbe(server.pid).read()
        assert held > 3 * 1024 * 32768  # at least its KV cache
        assert device.read() - before >= held * 0.9
        assert ProcessRssProbe(server.pid).read() > 0
