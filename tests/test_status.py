"""`serve status` on a cluster started as `make serve` starts it (a local `ray.init`).

Ray >= 2.52 turns token authentication on for such a cluster and keeps the token in
~/.ray/auth_token, but Serve's CLI sends that token only when RAY_AUTH_MODE=token is set in its
own environment; without it the dashboard answers "Missing authentication token". `make status`
runs the command below; serve.status() (through the controller, no dashboard) needs nothing."""
import os
import subprocess
import sys

import pytest
import ray
import yaml
from ray import serve
from cluster.local_cluster import free_port

STATUS_COMMAND = [os.path.join(os.path.dirname(sys.executable), "serve"), "status"]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class Echo:
    def __call__(self, request) -> str:
        return "ok"


@pytest.fixture(scope="module")
def dashboard():
    port = free_port()
    ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    serve.run(Echo.bind(), name="status-test", route_prefix="/echo")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_serve_status_cli_shows_replica_states(dashboard):
    # A user's shell: whatever this process inherited from ray.init, only the documented variable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "token"}
    run = subprocess.run([*STATUS_COMMAND, "--address", dashboard], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    status = yaml.safe_load(run.stdout)
    app = status["applications"]["status-test"]
    assert app["status"] == "RUNNING"
    assert app["deployments"]["Echo"]["replica_states"] == {"RUNNING": 1}


def test_serve_status_in_python_shows_replica_states(dashboard):
    deployment = serve.status().applications["status-test"].deployments["Echo"]
    assert deployment.status == "HEALTHY" and deployment.replica_states == {"RUNNING": 1}
