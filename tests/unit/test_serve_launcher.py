"""What the launcher hands to MMS: its configuration, environment and handler module."""
import importlib
import json
from pathlib import Path

import pytest

from kennel_serve.mms_toolkit import launcher, mms_config
from kennel_serve.settings import ServeSettings


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def settings(**env) -> ServeSettings:
    return ServeSettings.from_env({"KENNEL_SERVE_STATE_DIR": "/tmp/ks-unit", "KENNEL_MMS_PLUGINS": "/opt/p", **env})


def test_mms_configuration_works_around_the_toolkit_defaults():
    config = properties(mms_config.mms_properties(settings(SAGEMAKER_MODEL_SERVER_WORKERS="3",
                                                           SAGEMAKER_MODEL_SERVER_TIMEOUT="45")))
    assert config["default_service_handler"] == "kennel_serve.mms_toolkit.handler_service"
    assert config["default_workers_per_model"] == "3"
    # The toolkit's default_response_timeout is read by MMS as minutes: seconds are written instead.
    assert config["default_response_timeout_seconds"] == "45" and "default_response_timeout" not in config
    assert config["inference_address"] == "http://0.0.0.0:8080"
    assert config["management_address"] == "unix:/tmp/ks-unit/management.sock"
    assert "-XX:+UseContainerSupport" in config["vmargs"] and "-XX:-UseContainerSupport" not in config["vmargs"]
    assert config["plugins_path"] == "/opt/p"
    # Bodies a little over the limit reach the handler (JSON 413); 6 MiB limit -> 12 MiB for MMS.
    assert int(config["max_request_size"]) == 2 * 6 * 1024 * 1024
    assert config["preload_model"] == "true"
    assert mms_config.LOG_CONFIG.is_file()


def test_the_handler_module_is_one_class_as_mms_requires():
    from mms.model_loader import ModelLoader

    # MMS's loader refuses a handler module that defines more (or fewer) than one class.
    module = importlib.import_module(mms_config.HANDLER_SERVICE)
    (service,) = ModelLoader.list_model_services(module)
    assert service is module.HandlerService
    assert callable(service.handle) and callable(service.initialize)


def test_explicit_settings_reach_mms():
    config = properties(mms_config.mms_properties(settings(SAGEMAKER_BIND_TO_PORT="9090", KENNEL_BIND_ADDRESS="127.0.0.1",
                                                           SAGEMAKER_MODEL_SERVER_VMARGS="-Xmx512m",
                                                           SAGEMAKER_MAX_PAYLOAD_IN_MB="20")))
    assert config["inference_address"] == "http://127.0.0.1:9090"
    assert config["vmargs"] == "-Xmx512m"
    assert int(config["max_request_size"]) == 40 * 1024 * 1024


def test_on_a_multi_model_endpoint_mms_listens_on_loopback_behind_the_routes(monkeypatch):
    multi = settings(SAGEMAKER_MULTI_MODEL="true", SAGEMAKER_BIND_TO_PORT="8080")
    assert multi.multi_model and not settings().multi_model
    config = properties(mms_config.mms_properties(multi, internal_port=28081))
    assert config["inference_address"] == "http://127.0.0.1:28081"
    assert config["management_address"].startswith("unix:")
    env = mms_config.mms_environment(multi, [], mme_secret="s3cret")
    assert env["KENNEL_MME_SECRET"] == "s3cret"
    assert "KENNEL_MME_SECRET" not in mms_config.mms_environment(settings(), [])
    port = launcher.loopback_port(avoid={28080})
    assert 28081 <= port < 28180


def test_mms_environment(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/kennel/lib")
    env = mms_config.mms_environment(settings(SAGEMAKER_MODEL_SERVER_WORKERS="1", KENNEL_ORT_THREADS="2"),
                                     [Path("/opt/ml/model/code"), Path("/tmp/ks-unit/packages")])
    assert env["PYTHONPATH"] == "/opt/ml/model/code:/tmp/ks-unit/packages:/opt/kennel/lib"
    assert (env["SAGEMAKER_MODEL_SERVER_WORKERS"], env["KENNEL_ORT_THREADS"], env["KENNEL_ORT_SOLO_THREADS"]) == ("1", "2", "2")
    # MMS's pid file and sockets go to the state dir, which every start resets.
    assert env["TMPDIR"] == env["TEMP"] == "/tmp/ks-unit/tmp"
    assert env["KENNEL_SERVE_STATE_DIR"] == "/tmp/ks-unit"
    assert json.loads(env["KENNEL_EXECUTION_PARAMETERS"])["MaxConcurrentTransforms"] == 1


def test_reset_state_dir_removes_what_a_killed_server_left(tmp_path):
    state = tmp_path / "state"
    (state / "tmp").mkdir(parents=True)
    (state / "tmp" / ".model_server.pid").write_text("1")
    (state / "failed").write_text("old")
    launcher.reset_state_dir(state)
    assert sorted(p.name for p in state.rglob("*")) == ["tmp"]


def test_a_taken_default_metrics_port_is_a_warning_and_a_named_one_stops_serve(monkeypatch, caplog):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr("kennel_serve.settings.METRICS_PORT", port)
        default = settings(KENNEL_BIND_ADDRESS="127.0.0.1")
        assert default.metrics_port == port and not default.metrics_port_required
        launcher.start_metrics(default)  # goes on without the endpoint
        assert f"no Prometheus endpoint: 127.0.0.1:{port} is taken" in caplog.text
        named = settings(KENNEL_BIND_ADDRESS="127.0.0.1", KENNEL_METRICS_PORT=str(port))
        with pytest.raises(launcher.ServeError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            launcher.start_metrics(named)
