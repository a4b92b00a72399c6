"""Start a real TensorBoard server on 127.0.0.1 and read a run's loss curve back over HTTP."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_loss_curve(trained_run):
    run = Path(trained_run["run_dir"])
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run.parent), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    query = urllib.parse.urlencode({"run": run.name, "tag": "train/loss"})
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
    try:
        deadline, points = time.time() + 90, None
        while time.time() < deadline and points is None:
            assert server.poll() is None, server.stdout.read().decode(errors="replace")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = json.loads(response.read())
                    points = body if body else None
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            if points is None:
                time.sleep(0.5)
        assert points, "TensorBoard never served the train/loss curve"
        served = [(step, value) for _, step, value in points]
        on_disk = [(e.step, e.value) for e in EventAccumulator(str(run)).Reload().Scalars("train/loss")]
        assert [s for s, _ in served] == [s for s, _ in on_disk]
        assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(served, on_disk))
    finally:
        server.terminate()
        server.wait(timeout=20)
