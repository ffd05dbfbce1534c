"""``make demo``: what fedgw can do so far, as the commands a user would type.

A gateway for domain ``cluster1`` starts on a private state dir; a network service and
an endpoint are registered; the gateway restarts and still has them. Everything runs
in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDGW = str(Path(sys.executable).with_name("fedgw"))
T0 = time.monotonic()


def step(text: str) -> None:
    print(f"\n[{time.monotonic() - T0:6.2f}s] {text}", flush=True)


def fedgw(*args: str, env: dict[str, str]) -> None:
    print(f"  $ fedgw {shlex.join(args)}", flush=True)
    result = subprocess.run([FEDGW, *args], env=env, capture_output=True, text=True, check=False)
    for line in (result.stdout + result.stderr).rstrip().splitlines():
        print(f"    {line}")
    if result.returncode != 0:
        raise SystemExit(f"demo failed: fedgw {' '.join(args)} exited {result.returncode}")


def start_gateway(base: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [
        "gateway",
        "serve",
        "--domain",
        "cluster1",
        "--state-dir",
        str(base / "state"),
        "--socket",
        str(base / "gw.sock"),
    ]
    print(f"  $ fedgw {shlex.join(cmd)} &", flush=True)
    log = (base / "gateway.log").open("ab")
    proc = subprocess.Popen([FEDGW, *cmd], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not (base / "gw.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gateway did not start:\n{(base / 'gateway.log').read_text()}")
        time.sleep(0.05)
    print(f"    gateway pid {proc.pid}, local API on {base / 'gw.sock'}")
    return proc


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)
    print(f"    gateway stopped (exit {proc.returncode})")


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="fedgw-demo-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGW_")}
    env["FEDGW_GATEWAY"] = str(base / "gw.sock")
    proc = None
    try:
        step("Start the gateway of domain cluster1 (state in a private dir, API on a socket)")
        proc = start_gateway(base, env)
        step("Register the network service vpn-gateway, exported to cluster2")
        fedgw("ns", "register", "vpn-gateway", "--export", "cluster2", env=env)
        step("Register an endpoint that provides it, with a 10 minute lease")
        fedgw(
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
            env=env,
        )
        fedgw("nse", "list", env=env)
        step("Bad input is refused with a clear message")
        print("  $ fedgw nse register Bad_Name --service x")
        bad = subprocess.run(
            [FEDGW, "nse", "register", "Bad_Name", "--service", "x"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        print(f"    {bad.stderr.strip()}  (exit {bad.returncode})")
        step("Restart the gateway: nothing registered is lost")
        stop_gateway(proc)
        proc = start_gateway(base, env)
        fedgw("nse", "list", env=env)
        fedgw("status", env=env)
        step("Stop the gateway and clean up")
        stop_gateway(proc)
        proc = None
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    print("\nDone. Next: `fedgw --help`; the README has the CLI reference.")


if __name__ == "__main__":
    main()
