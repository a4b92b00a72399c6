"""`tinylm download` against a real HTTP server on 127.0.0.1 (Range requests, dropped connections,
corrupted files); nothing here reaches the internet."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT

from tinylm import download
from tinylm.errors import UserError

# The real corpus, from the shared/ folder beside the repository (or beside a worktree's parent) on
# project machines; it is never committed.
SHAKESPEARE = next((p for p in (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                                ROOT.parents[1] / "shared" / "data" / "tinyshakespeare.txt") if p.is_file()),
                   ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")


class Server:
    """Serves `files` (name -> bytes) with HTTP Range support; records every request. A file listed in
    `drop_after` is cut off after that many bytes of a response (the connection closes mid-body)."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True):
        self.files, self.ranges, self.drop_after = files, ranges, {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[name], 0
                want = self.headers.get("Range")
                if want and server.ranges:
                    start = int(want.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                chunk = body[start:]
                cut = server.drop_after.pop(name, None)
                if cut is not None:
                    chunk = chunk[:cut]
                self.wfile.write(chunk)
                server.sent += len(chunk)
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


BODY = bytes(range(256)) * 2000  # 512,000 bytes


def test_resumes_a_partial_file_with_a_range_request(tmp_path):
    part = tmp_path / "c.txt.part"
    part.write_bytes(BODY[:200_000])  # an earlier, interrupted download
    with Server({"c.txt": BODY}) as server:
        download.fetch(f"{server.url}/c.txt", part, sha(BODY), "c.txt")
    assert part.read_bytes() == BODY
    assert server.requests == [("c.txt", "bytes=200000-")]
    assert server.sent == len(BODY) - 200_000  # only the missing bytes travelled


def test_dropped_connection_is_retried_from_where_it_stopped(tmp_path, capsys):
    part = tmp_path / "c.txt.part"
    with Server({"c.txt": BODY}) as server:
        server.drop_after["c.txt"] = 100_000
        download.fetch(f"{server.url}/c.txt", part, sha(BODY), "c.txt")
    assert part.read_bytes() == BODY
    assert server.requests == [("c.txt", None), ("c.txt", "bytes=100000-")]
    assert "retrying" in capsys.readouterr().err


def test_server_without_range_support_gives_the_whole_file_again(tmp_path):
    part = tmp_path / "c.txt.part"
    part.write_bytes(BODY[:1000])
    with Server({"c.txt": BODY}, ranges=False) as server:
        download.fetch(f"{server.url}/c.txt", part, sha(BODY), "c.txt")
    assert part.read_bytes() == BODY  # overwritten, not appended to


def test_checksum_mismatch_is_refused_and_deleted(tmp_path):
    part = tmp_path / "c.txt.part"
    with Server({"c.txt": BODY[:-1] + b"!"}) as server:  # one byte differs
        with pytest.raises(UserError, match="failed its checksum"):
            download.fetch(f"{server.url}/c.txt", part, sha(BODY), "c.txt")
    assert not part.exists()


def test_a_corrupt_partial_file_gets_one_clean_retry(tmp_path, capsys):
    part = tmp_path / "c.txt.part"
    part.write_bytes(b"\x00" * 5000)  # wrong bytes kept from an earlier attempt
    with Server({"c.txt": BODY}) as server:
        download.fetch(f"{server.url}/c.txt", part, sha(BODY), "c.txt")
    assert part.read_bytes() == BODY
    assert server.requests == [("c.txt", "bytes=5000-"), ("c.txt", None)]
    assert "again from the start" in capsys.readouterr().err


def test_zip_member_is_extracted(tmp_path, monkeypatch):
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("corpus", "hello zip\n" * 1000)
    archive = buf.getvalue()
    remote = download.Remote("https://example.invalid/corpus.zip", sha(archive), len(archive), "corpus.txt", member="corpus")
    monkeypatch.setitem(download.CORPORA, "zipped", download.Corpus("test", (remote,), "train {dir}"))
    with Server({"corpus.zip": archive}) as server:
        (path,) = download.download("zipped", tmp_path / "data", mirror=server.url, out=lambda s: None)
    assert path.read_text() == "hello zip\n" * 1000
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["corpus.txt"]  # the zip is not kept


# ---------------------------------------------------------------- the command


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tinylm", "download", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"needs the real corpus at {SHAKESPEARE}")
def test_download_shakespeare_from_a_mirror(tmp_path):
    body = SHAKESPEARE.read_bytes()
    with Server({"input.txt": body}) as server:
        result = run(["shakespeare", "--mirror", server.url], tmp_path)
        again = run(["shakespeare", "--mirror", server.url], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "shakespeare.txt").read_bytes() == body
    assert "100%" in result.stderr and "1.06M" in result.stderr  # tqdm's progress bar, in bytes
    assert "sha256 verified" in result.stdout and "tinylm train --data data/shakespeare.txt --config shakespeare_char" in result.stdout
    assert again.returncode == 0 and "already there" in again.stdout and len(server.requests) == 1


def test_download_refuses_a_file_with_the_wrong_checksum(tmp_path):
    with Server({"input.txt": b"To be, or not to be\n" * 1000}) as server:
        result = run(["shakespeare", "--mirror", server.url], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: shakespeare.txt from")
    assert "failed its checksum" in result.stderr and "Traceback" not in result.stderr
    assert "100%" in result.stderr  # the progress bar ran before the check
    assert list((tmp_path / "data").iterdir()) == []  # neither the file nor a .part is left


def test_download_offline_is_one_clear_line(tmp_path):
    with Server({}) as server:
        url = server.url  # a port that is closed once the server stops
    result = run(["ptb", "--mirror", url], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download ptb/train.txt")
    assert "check the internet connection" in lines[0]
    assert not (tmp_path / "data").exists()


def test_unknown_corpus_names_the_known_ones(tmp_path):
    result = run(["shakespear"], tmp_path)
    assert result.returncode == 2 and "unknown corpus 'shakespear'; available: shakespeare, ptb, enwik8" in result.stderr
    listing = run(["--list"], tmp_path)
    assert listing.returncode == 0 and all(name in listing.stdout for name in download.CORPORA)
