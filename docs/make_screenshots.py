"""Remake the TensorBoard screenshots in docs/screenshots/ with a real TensorBoard server and a real browser.

    python docs/make_screenshots.py                          # trains a short run first (5 minutes)
    python docs/make_screenshots.py --run_dir runs/default   # or photographs a run you already have

The pictures of README.md and docs/explain.md: `python docs/make_screenshots.py --data tinyshakespeare.txt
--max_time 900` (a 3-layer, 128-wide model, the short run's recipe below, for 15 minutes on a 2-core CPU).

Needs Chromium (Debian/Ubuntu: `apt-get install chromium`; elsewhere set --browser). The script starts
`tensorboard --logdir <the run's parent folder>` on 127.0.0.1 at a free port, waits until it serves the
run's curves and histograms, then saves one headless Chromium screenshot per view:

    docs/screenshots/loss.png             train/loss, val/loss and train/eval_loss
    docs/screenshots/histograms.png       weights and biases of the first block, one histogram per tensor
    docs/screenshots/update_ratio.png     the update-to-weight ratio of each kind of parameter
    docs/screenshots/projector.png        the token embeddings in the embedding projector (PCA, 3-D)
    docs/screenshots/custom_scalars.png   the Custom Scalars tab: train and val loss on one chart (tblog.LAYOUT)
    docs/screenshots/probe_loss.png       the loss on each token of the probe (tinylm/probe.py)
    docs/screenshots/probe_text.png       the probe's next-token candidates at a few positions
    docs/screenshots/attention.png        the attention map of every head over the probe
    docs/screenshots/track.png            the tracked numbers, their gradients and moments (tinylm/track.py)

`--only attention.png track.png` takes only those pictures.

Everything it starts (training, TensorBoard, Chromium) is stopped before it exits. Look at the pictures
before committing them: a page can be caught while it is still drawing (the projector greys out while
it computes), and running the script again takes a fresh picture.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (file name, TensorBoard view after the '#' with its tag filter (a regular expression), window size, extra
# flags). The projector draws with WebGL, which a GPU-less headless browser only has through SwiftShader.
SHOTS = [
    ("loss.png", "scalars&tagFilter=loss", (1400, 900), []),
    ("histograms.png", "histograms&tagFilter=blocks%5C.0%5C.(attn%7Cmlp)", (1400, 1350), []),
    ("update_ratio.png", "scalars&tagFilter=update_ratio", (1400, 900), []),
    ("projector.png", "projector", (1400, 900), ["--enable-unsafe-swiftshader"]),
    ("custom_scalars.png", "custom_scalars", (1400, 1000), []),
    ("probe_loss.png", "scalars&tagFilter=probe", (1400, 1000), []),
    ("probe_text.png", "text&tagFilter=probe", (1400, 1000), []),
    ("attention.png", "images&tagFilter=attention", (1400, 1350), []),
    ("track.png", "scalars&tagFilter=track", (1400, 1000), []),
]
BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A model small enough to take a few hundred steps in minutes on a CPU, so the curves have a shape.
SHORT_RUN = ["--data.vocab_size=2048", "--model.n_layer=3", "--model.n_head=4", "--model.n_embd=128",
             "--model.block_size=64", "--train.eval_interval=100", "--train.eval_batches=10", "--train.sample_tokens=60"]


def train_short_run(where: Path, data: str | None, max_time: float) -> Path:
    """Train SHORT_RUN on `data` (default: the built-in corpus) for max_time seconds into where/runs/."""
    run = where / "runs" / (Path(data).stem if data else "builtin")
    extra = ["--data", str(Path(data).resolve())] if data else []
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--run_dir", str(run), *extra, *SHORT_RUN,
                    f"--train.max_time={max_time}"], cwd=where, check=True)
    return run


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
        return None


def wait_until_served(base: str, run: str, server: subprocess.Popen, timeout: float = 120) -> None:
    """Until TensorBoard has read the run's scalars and histograms (it loads event files in the background)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: tensorboard exited with status {server.returncode}")
        scalars = get_json(f"{base}/data/plugin/scalars/tags") or {}
        histograms = get_json(f"{base}/data/plugin/histograms/tags") or {}
        if "val/loss" in scalars.get(run, {}) and histograms.get(run):
            return
        time.sleep(1)
    sys.exit(f"error: tensorboard did not serve {run}'s data within {timeout:.0f} s")


def screenshot(browser: str, url: str, path: Path, size: tuple[int, int], extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as profile:  # a new empty profile: no state from earlier runs
        subprocess.run(
            [browser, *BROWSER_FLAGS, *extra, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
             "--virtual-time-budget=60000", f"--screenshot={path}", url],
            check=True, capture_output=True, timeout=180,
        )
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", help="a finished run to photograph (default: train a short one)")
    p.add_argument("--data", help="text file for the short run (default: the built-in corpus)")
    p.add_argument("--max_time", type=float, default=300, help="seconds the short run trains")
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots"), help="where the PNG files go")
    p.add_argument("--only", nargs="+", metavar="NAME", help="take only these pictures (file names above)")
    p.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                   help="a Chromium or Chrome binary")
    args = p.parse_args()
    if not args.browser:
        sys.exit("error: no chromium found; install it (apt-get install chromium) or pass --browser")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run_dir) if args.run_dir else train_short_run(Path(tmp), args.data, args.max_time)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(run.resolve().parent), "--host", "127.0.0.1",
             "--port", str(port), "--load_fast", "false"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_served(base, run.name, server)
            for name, view, size, extra in SHOTS:
                if args.only and name not in args.only:
                    continue
                screenshot(args.browser, f"{base}/#{view}", out / name, size, extra)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
