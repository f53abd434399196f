"""Visdom logging against a real local server, and one warning (no crash) when no server answers."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import warnings

import pytest

visdom = pytest.importorskip("visdom", reason="visdom is a declared dependency; install it into .venv")

from devis_core.logging_utils import TrainingLog, VisdomLog  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_losses_and_ap_reach_a_local_visdom_server(tmp_path):
    port = _free_port()
    # `python -m visdom.server` first downloads its web UI scripts from a CDN; the API needs none of them,
    # so the server's main() is started directly (no network).
    server = subprocess.Popen([sys.executable, "-c", "from visdom.server.run_server import main; main()",
                               "-port", str(port), "--hostname", "127.0.0.1",
                               "-env_path", str(tmp_path / "env"), "-logging_level", "WARNING"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = visdom.Visdom(server="http://127.0.0.1", port=port, use_incoming_socket=False,
                               raise_exceptions=False)
        deadline = time.time() + 60
        while not client.check_connection(timeout_seconds=1):
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "visdom server did not start within 60 s"
        vis = VisdomLog("http://127.0.0.1", port, env="devis_test")
        assert vis.enabled
        log = TrainingLog(tmp_path, visdom=vis)
        log.log({"kind": "train_iter", "epoch": 1, "epoch_fraction": -0.5, "train_loss": 3.0, "lr": 1e-4})
        log.log({"kind": "train_epoch", "epoch": 1, "train_loss": 2.5, "lr": 1e-4})
        log.log({"kind": "eval", "epoch": 1, "AP": 0.25, "val_loss": 2.75})
        data = json.loads(client.get_window_data(win="devis_test_loss", env="devis_test"))
        traces = {t["name"]: (t["x"], t["y"]) for t in data["content"]["data"]}
        assert traces["train_loss"] == ([0.5, 1.0], [3.0, 2.5])
        assert traces["val_loss"] == ([1.0], [2.75])
        ap = json.loads(client.get_window_data(win="devis_test_AP", env="devis_test"))
        assert [(t["name"], t["y"]) for t in ap["content"]["data"]] == [("AP", [0.25])]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_missing_server_gives_one_warning_and_logging_goes_on(tmp_path):
    port = _free_port()  # nothing listens there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis = VisdomLog("http://127.0.0.1", port, env="nobody", timeout_s=0.5)
        log = TrainingLog(tmp_path, visdom=vis)
        for e in range(3):
            log.log({"kind": "train_epoch", "epoch": e, "train_loss": 1.0})
    assert not vis.enabled
    msgs = [str(w.message) for w in caught if "Visdom" in str(w.message)]
    assert len(msgs) == 1 and f"127.0.0.1:{port} is not reachable" in msgs[0]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
