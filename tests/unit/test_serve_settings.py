"""Serving settings from the environment: defaults, overrides, CPU detection, bad values."""
import ipaddress
import json

import pytest

from kennel_serve import cpus
from kennel_serve.settings import MIB, ServeSettings, SettingsError


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr("kennel_env.usable_cpus", lambda: 2)


def test_defaults_follow_the_sagemaker_contract(two_cpus):
    settings = ServeSettings.from_env({})
    assert str(settings.model_dir) == "/opt/ml/model"
    assert settings.port == 8080
    assert settings.max_payload_bytes == 6 * MIB
    # One single-threaded worker per CPU; a request alone runs on both CPUs.
    assert (settings.workers, settings.ort_threads, settings.solo_threads) == (2, 1, 2)
    assert settings.model_server_timeout_s == 60
    assert settings.url.enabled and not settings.url.allowed_networks


def test_sagemaker_variables_are_honoured(two_cpus):
    settings = ServeSettings.from_env({
        "SAGEMAKER_BASE_DIR": "/srv/ml", "SAGEMAKER_BIND_TO_PORT": "9090", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "120"})
    assert str(settings.model_dir) == "/srv/ml/model"
    assert settings.port == 9090
    assert settings.max_payload_bytes == 20 * MIB
    # One worker set: it gets every CPU as engine threads.
    assert (settings.workers, settings.ort_threads) == (1, 2)
    assert settings.model_server_timeout_s == 120
    assert ServeSettings.from_env({"SAGEMAKER_MODEL_SERVER_TIMEOUT": "120",
                                   "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "30"}).model_server_timeout_s == 30


@pytest.mark.parametrize("env, layout", [
    ({"KENNEL_ORT_THREADS": "2"}, (1, 2)),
    ({"SAGEMAKER_MODEL_SERVER_WORKERS": "4", "KENNEL_ORT_THREADS": "3"}, (4, 3)),
    ({"SAGEMAKER_MODEL_SERVER_WORKERS": "8"}, (8, 1)),
])
def test_workers_and_threads_override(two_cpus, env, layout):
    settings = ServeSettings.from_env(env)
    assert (settings.workers, settings.ort_threads) == layout


def test_batch_transform_settings_and_execution_parameters(two_cpus):
    settings = ServeSettings.from_env({"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "1",
                                       "SAGEMAKER_BATCH_STRATEGY": "single_record", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "50"})
    assert settings.batch and settings.workers == 1  # no more workers than concurrent requests
    assert json.loads(settings.execution_parameters()) == {
        "MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 50}
    # Without a given concurrency, the answer is what the server can do at once: one request per worker.
    assert json.loads(ServeSettings.from_env({})
                      .execution_parameters())["MaxConcurrentTransforms"] == 2


def test_allowlist_takes_addresses_networks_and_host_names(two_cpus):
    url = ServeSettings.from_env({"KENNEL_URL_ALLOWLIST": "127.0.0.1, 10.0.0.0/8; images.internal.,fd00::/8"}).url
    assert url.allowed_networks == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
                                    ipaddress.ip_network("fd00::/8"))
    assert url.allowed_hosts == ("images.internal",)
    assert not ServeSettings.from_env({"KENNEL_URL_FETCH": "false"}).url.enabled


@pytest.mark.parametrize("env, message", [
    ({"SAGEMAKER_MODEL_SERVER_WORKERS": "two"}, "SAGEMAKER_MODEL_SERVER_WORKERS='two' is not a whole number"),
    ({"SAGEMAKER_MODEL_SERVER_WORKERS": "0"}, "SAGEMAKER_MODEL_SERVER_WORKERS=0 must be at least 1"),
    ({"SAGEMAKER_BIND_TO_PORT": "40000"}, "SAGEMAKER_BIND_TO_PORT=40000 must be between 1 and 32766"),
    ({"SAGEMAKER_BATCH_STRATEGY": "ALL"}, "SAGEMAKER_BATCH_STRATEGY='ALL' must be one of"),
    ({"KENNEL_URL_FETCH": "maybe"}, "KENNEL_URL_FETCH='maybe' must be true or false"),
    ({"KENNEL_URL_TIMEOUT_S": "soon"}, "KENNEL_URL_TIMEOUT_S='soon' is not a number"),
    ({"KENNEL_DRAIN_TIMEOUT_S": "60"}, "KENNEL_DRAIN_TIMEOUT_S=60.0 must be between 0 and 25"),
    ({"KENNEL_URL_ALLOWLIST": "http://x/"}, "KENNEL_URL_ALLOWLIST entry 'http://x/'"),
    ({"KENNEL_ORT_SOLO_THREADS": "0"}, "KENNEL_ORT_SOLO_THREADS=0 must be"),
])
def test_bad_values_name_the_variable(two_cpus, env, message):
    with pytest.raises(SettingsError) as error:
        ServeSettings.from_env(env)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_worker_layout_fills_the_cpus_without_oversubscribing():
    assert [cpus.worker_layout(n) for n in (1, 2, 3, 4, 8)] == [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1)]
    assert cpus.worker_layout(4, workers=2) == (2, 2)
    assert cpus.worker_layout(4, threads=4) == (1, 4)
    assert cpus.worker_layout(2, workers=3) == (3, 1)


def test_solo_threads_default_to_every_cpu_unless_the_engine_threads_are_set():
    assert [cpus.solo_threads(n, 1, threads_set=False) for n in (1, 2, 4)] == [1, 2, 4]
    assert cpus.solo_threads(4, 2, threads_set=True) == 2  # KENNEL_ORT_THREADS fixes the configuration
    assert cpus.solo_threads(4, 1, threads_set=True, solo=3) == 3
    assert cpus.solo_threads(4, 2, threads_set=False, solo=1) == 2  # never fewer than the engine threads
