"""Memory probes: the one that follows the server is picked and named; a forced one that cannot run says why."""

from __future__ import annotations

import pytest
from kvbatch.errors import UserInputError
from kvbatch.serve.probes import NvmlProcessProbe, ProcessRssProbe, nvml_available, probe_for_server


def test_a_cpu_server_is_followed_by_its_rss_and_the_log_is_exact(embedded_server):
    assert not embedded_server.log().on_gpu
    probe = probe_for_server(embedded_server.pid, embedded_server.log_text)
    assert probe.name == "process-rss"
    assert probe.read() > 200 * 2**20  # the model's weights alone are 253 MB on disk
    log_probe = probe_for_server(embedded_server.pid, embedded_server.log_text, "server-log-kv")
    assert log_probe.read() == 54 * 2**20 and log_probe.name == "server-log-kv"


def test_unknown_or_impossible_probes_say_why(embedded_server):
    with pytest.raises(UserInputError, match="known probes: auto, nvml-device, nvml-process, process-rss"):
        probe_for_server(embedded_server.pid, embedded_server.log_text, "magic")
    if not nvml_available():
        with pytest.raises(UserInputError, match="cannot run here: no NVIDIA GPU answers"):
            probe_for_server(embedded_server.pid, embedded_server.log_text, "nvml-process")


@pytest.mark.gpu
def test_nvml_follows_a_gpu_server():
    """Opt-in (KVBATCH_GPU_TESTS=1) on a machine with an NVIDIA GPU and a CUDA build of llama-server."""
    from kvbatch.serve.config import ServerConfig
    from kvbatch.serve.server import EmbeddedServer

    with EmbeddedServer(ServerConfig(context_tokens=32768)) as server:
        assert server.log().on_gpu
        probe = probe_for_server(server.pid, server.log_text)
        assert isinstance(probe, NvmlProcessProbe)
        assert probe.read() > 3 * 1024 * 32768  # at least its KV cache
        assert ProcessRssProbe(server.pid).read() > 0
