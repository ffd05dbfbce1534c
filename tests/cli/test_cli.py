"""``fedgw`` as a user runs it, against a real ``fedgw gateway serve`` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import FEDGW, GatewayProcess


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDGW, *args], capture_output=True, text=True, timeout=60, env=env or dict(os.environ)
    )


def test_register_restart_list(gateway_process: GatewayProcess) -> None:
    gp = gateway_process
    gp.cli("ns", "register", "vpn-gateway", "--export", "cluster2", check=True)
    out = gp.cli(
        "nse",
        "register",
        "vpn-gw-1",
        "--service",
        "vpn-gateway",
        "--label",
        "zone=a",
        "--pool",
        "172.16.1.0/24",
        "--route",
        "10.60.0.0/16",
        "--ttl",
        "10m",
        check=True,
    ).stdout
    assert "endpoint vpn-gw-1 registered for vpn-gateway; lease 10m" in out
    gp.restart()
    listed = json.loads(gp.cli("nse", "list", "--json", check=True).stdout)
    assert [e["name"] for e in listed] == ["vpn-gw-1"]
    assert listed[0]["labels"] == {"zone": "a"}
    assert listed[0]["pool"] == "172.16.1.0/24"
    services = json.loads(gp.cli("ns", "list", "--json", check=True).stdout)
    assert services[0]["export"] == ["cluster2"]
    table = gp.cli("nse", "list", check=True).stdout
    assert table.split()[:7] == [
        "NAME",
        "SERVICES",
        "LABELS",
        "POOL",
        "ROUTES",
        "WORKLOAD",
        "EXPIRES",
    ]
    assert "vpn-gw-1" in table
    assert "172.16.1.0/24" in table


def test_bad_name_is_one_clear_line(gateway_process: GatewayProcess) -> None:
    r = gateway_process.cli("nse", "register", "Bad_Name", "--service", "x")
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: name 'Bad_Name' has 'B' at character 1")
    assert "Traceback" not in r.stderr


def test_errors_from_the_gateway(gateway_process: GatewayProcess) -> None:
    gp = gateway_process
    r = gp.cli("nse", "register", "e1", "--service", "x", "--netns", "surely-missing")
    assert r.returncode == 1
    missing = "network namespace 'surely-missing' does not exist (no /run/netns/surely-missing)"
    assert r.stderr == f"error: {missing}\n"
    r = gp.cli("nse", "delete", "nope")
    assert (r.returncode, r.stderr) == (1, "error: endpoint 'nope' is not registered\n")
    r = gp.cli("nse", "register", "e1", "--service", "x", "--ttl", "soon")
    assert r.returncode == 1
    assert "--ttl 'soon' is not understood at character 1" in r.stderr
    r = gp.cli("nse", "register", "e1", "--service", "x", "--label", "zone")
    assert r.returncode == 1
    assert "--label 'zone' must have the form key=value" in r.stderr
    r = gp.cli("nse", "register", "e1", "--service", "x", "--pool", "10.0.0.1/8")
    assert r.returncode == 1
    assert "did you mean '10.0.0.0/8'" in r.stderr
    gp.cli("nse", "register", "e1", "--service", "x", check=True)
    r = gp.cli("ns", "delete", "x")
    assert r.returncode == 1
    assert "still has 1 endpoint(s) (e1)" in r.stderr


def test_usage_errors_exit_2(gateway_process: GatewayProcess) -> None:
    r = gateway_process.cli("nse", "register", "e1")  # --service missing
    assert r.returncode == 2
    assert "--service" in r.stderr
    assert gateway_process.cli("no-such-command").returncode == 2


def test_unreachable_gateway(short_tmp: Path) -> None:
    env = {**os.environ, "FEDGW_GATEWAY": str(short_tmp / "none.sock")}
    r = run("ns", "list", env=env)
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: cannot reach the gateway at unix:{short_tmp}/none.sock: ")
    assert len(r.stderr.splitlines()) == 1


def test_status_and_json_everywhere(gateway_process: GatewayProcess) -> None:
    gp = gateway_process
    status = json.loads(gp.cli("status", "--json", check=True).stdout)
    assert status["domain"] == "cluster1"
    assert status["socket"] == str(gp.socket)
    assert "domain" in gp.cli("status", check=True).stdout
    assert json.loads(gp.cli("ns", "list", "--json", check=True).stdout) == []
    registered = json.loads(gp.cli("ns", "register", "dns", "--json", check=True).stdout)
    assert registered["name"] == "dns"
    assert registered["export"] == []
    assert gp.cli("--version", check=True).stdout.startswith("fedgw ")


def test_events_stream_as_json_lines(gateway_process: GatewayProcess) -> None:
    gp = gateway_process
    env = {**os.environ, "FEDGW_GATEWAY": str(gp.socket)}
    watcher = subprocess.Popen(
        [FEDGW, "events", "--snapshot", "--json"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert watcher.stdout is not None
        assert json.loads(watcher.stdout.readline())["type"] == "synced"
        gp.cli("ns", "register", "vpn", check=True)
        event = json.loads(watcher.stdout.readline())
        assert (event["type"], event["kind"], event["name"]) == ("added", "service", "vpn")
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(10)
    assert watcher.returncode == 130


def test_serve_refuses_a_held_state_dir(gateway_process: GatewayProcess, short_tmp: Path) -> None:
    second = GatewayProcess(gateway_process.base, "cluster1")
    r = run(
        "gateway",
        "serve",
        "--dataplane",
        "off",
        "--domain",
        "cluster1",
        "--state-dir",
        str(gateway_process.base / "state"),
        "--socket",
        str(short_tmp / "other.sock"),
    )
    assert r.returncode == 1
    assert "is in use by another gateway" in r.stderr
    assert "Traceback" not in r.stderr
    assert second.proc is None


def test_serve_settings_errors(short_tmp: Path) -> None:
    r = run("gateway", "serve", "--dataplane", "off", "--state-dir", str(short_tmp / "s"))
    assert r.returncode == 1
    assert "domain is required" in r.stderr
    r = run(
        "gateway",
        "serve",
        "--dataplane",
        "off",
        "--domain",
        "Bad",
        "--state-dir",
        str(short_tmp / "s"),
    )
    assert r.returncode == 1
    assert "'B' at character 1" in r.stderr


def test_sigterm_leaves_no_socket(short_tmp: Path) -> None:
    gp = GatewayProcess(short_tmp, "cluster9")
    gp.start()
    assert gp.socket.exists()
    assert gp.stop(signal.SIGTERM) == 0
    assert not gp.socket.exists()
    gp.start()  # and starts again on the same state dir
    assert gp.stop(signal.SIGINT) == 0
    assert not gp.socket.exists()


def test_stale_socket_is_replaced(short_tmp: Path) -> None:
    gp = GatewayProcess(short_tmp, "cluster1")
    gp.start()
    assert gp.proc is not None
    gp.proc.kill()  # no chance to clean up
    gp.proc.wait()
    gp.proc = None
    assert gp.socket.exists()
    gp.start()
    assert gp.stop() == 0
