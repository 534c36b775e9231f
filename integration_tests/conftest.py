"""Shared fixtures for integration tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `hub_server`, however pytest was started

from tests.conftest import exact_kernels  # noqa: E402,F401  (a shared fixture)


@pytest.fixture(scope="session")
def real():
    """The real model's folder, its tokenizer, the calibration text (Emma) and the test text (Austen)."""
    from transformers import AutoTokenizer

    from hf_vq import assets

    model_dir = assets.ensure_smollm2()
    return model_dir, AutoTokenizer.from_pretrained(model_dir), assets.austen_calibration_text(), \
        assets.austen_test_text()


@pytest.fixture(scope="session")
def rtn4(real):
    """SmolLM2 with RTN 4-bit g128 in fp32: the baseline several quality tests compare against, quantized once per
    session. Shared: tests must not change it."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_vq

    return AutoModelForCausalLM.from_pretrained(real[0], dtype=torch.float32,
                                                quantization_config=hf_vq.RTNConfig(bits=4, group_size=128))


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A Hub-compatible server on 127.0.0.1 (olah + write front) with huggingface_hub and transformers pointed at it.

    huggingface_hub reads its endpoint, cache and Xet settings at import time, so the already-imported constants (and
    the clients built from them) are patched too, and restored at teardown.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api
    import transformers.utils.hub as tf_hub

    from hub_server import HubServer

    workdir = tmp_path_factory.mktemp("hub")
    server = HubServer(workdir).start()
    cache = str(workdir / "client-cache")
    mp = pytest.MonkeyPatch()
    try:
        for key, value in {"HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                           "HF_TOKEN": "hf_dummy_test_token", "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "0",
                           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
            mp.setenv(key, value)
        mp.setattr(constants, "ENDPOINT", server.endpoint)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the server has no Xet; hf_xet is installed
        mp.setattr(constants, "HF_HUB_CACHE", cache)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        mp.setattr(hf_api.api, "endpoint", server.endpoint)  # module-level client behind create_repo() & co.
        mp.setattr(tf_hub, "_hf_api", None)  # transformers' cached client is rebuilt with the patched endpoint
        yield server
    finally:
        mp.undo()
        tf_hub._hf_api = None
        server.stop()
