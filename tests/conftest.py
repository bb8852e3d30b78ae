"""Test setup: MLflow and Prefect point at a temporary folder; one Prefect test server for the whole session."""

import os
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="kiln-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_TMP / "prefect"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TMP / 'mlflow.db'}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def smoke_config():
    from kiln.config import load_config

    return load_config("smoke")


@pytest.fixture(scope="session")
def text_encoder(smoke_config):
    from kiln.text_encoder import build_text_encoder

    return build_text_encoder(smoke_config.text_encoder)
