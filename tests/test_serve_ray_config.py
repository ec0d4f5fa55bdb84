"""The Ray Serve config shipped in recipes/ray-serve.yaml, deployed for real with Ray's own `serve run` on a
local instance (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as the file says: everything on 127.0.0.1), with only its
paths and port changed: the same API answers through Ray's proxy, with per-replica metrics."""

import importlib.util
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from test_cli import save_tiny_llama
from test_serve import free_port, make_adapters
from test_serve_ray import listeners, off_loopback, ray_server

pytestmark = [pytest.mark.ray, pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                                  reason="Ray is not installed (pip install 'lorakit[ray]')")]
CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "ray-serve.yaml"


def test_the_config_validates_and_builds_the_application():
    from ray.serve.schema import ServeDeploySchema

    from lorakit.serve.ray import app

    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    (spec,) = config["applications"]
    assert spec["import_path"] == "lorakit.serve.ray:app"
    application = app(spec["args"])
    engine = application._bound_deployment.init_args[0]._bound_deployment  # the ingress is bound to the engine
    assert engine._deployment_config.num_replicas == spec["args"]["replicas"]
    assert engine.ray_actor_options["num_cpus"] == spec["args"]["cpus"]
    options = engine.init_args[0]
    assert (options.adapter_dir, options.max_loaded) == (spec["args"]["adapter_dir"], spec["args"]["max_loaded"])
    typed = app({"pins": ["a", "b"], "adapters": {"x": "runs/x"}, "max_loaded": 3})
    options = typed._bound_deployment.init_args[0]._bound_deployment.init_args[0]
    assert options.pins == ("a", "b") and options.adapters == (("x", "runs/x"),) and options.max_loaded == 3
    for args, message in [({"replicas": 0}, "replicas takes a positive whole number, got 0"),
                          ({"max_loaded": "many"}, "max_loaded takes a positive whole number, got 'many'"),
                          ({"cpus": "x"}, "cpus takes a positive number"), ({"port": 80}, "unknown argument 'port'")]:
        with pytest.raises(ValueError, match=message):
            app(args)


def test_serve_run_of_the_config_serves_on_the_loopback_address(tmp_path, smollm2_dir):
    model_dir = save_tiny_llama(tmp_path / "model", smollm2_dir, 32)
    make_adapters(model_dir, tmp_path / "adapters", ["a0", "a1"])
    config = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(model_path=str(model_dir), adapter_dir=str(tmp_path / "adapters"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    before = listeners()
    argv = [str(Path(sys.executable).parent / "serve"), "run", str(tmp_path / "config.yaml")]
    with ray_server(argv, port, signal.SIGINT, cwd=tmp_path, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0") as running:
        new = listeners() - before
        assert any(p.startswith("ray::ServeRepli") for _, p in new)
        assert off_loopback(new) == []
        client = running.client()
        texts = {n: client.completions.create(model=n, prompt="The quick brown fox", max_tokens=5,
                                              temperature=0).choices[0].text for n in ("a0", "a1", model_dir.name)}
        assert len(set(texts.values())) == 3  # two adapters and the base, each its own answer
        deadline = time.time() + 30
        while 'replica="' not in httpx.get(f"{running.url}/metrics", timeout=30).text:
            assert time.time() < deadline, "no replica reported its metrics"
            time.sleep(0.5)
