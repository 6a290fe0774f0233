"""`loralib download NAME [--dest models/adapters]`: fetch one released adapter file of the registry.

    loralib download roberta_base_lora_mnli            # -> models/adapters/roberta_base_lora_mnli.bin
    loralib download --list                            # every name, with base model, task, r, alpha

- Resumable: bytes land in DEST/FILE.part; running the command again asks the server for the rest
  (HTTP Range: bytes=N-) and appends. A server that ignores the range sends the whole file: we start over.
- Verified: where the registry knows the sha256, the finished file must match it, else the .part is
  removed (its bytes are wrong; resuming would not help) and no file is kept. Where it does not, the
  computed sha256 is written to DEST/FILE.sha256 (sha256sum format) and printed, to be copied into
  registry.json; a later run checks the file against that record.
- Atomic: the final name appears only once the whole file is there and checked (os.replace of the .part).
- Offline: one plain line and exit status 1.
After the download the file's keys and shapes are checked against the registry's expectation, as a
warning only (most expectations are inferred, not read from the files: `keys.verified` says which).
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from .registry import Adapter, Registry, UnknownAdapterError, check_state_dict, load_registry

CHUNK_BYTES = 1 << 16
DEFAULT_DEST = "models/adapters"


class DownloadError(RuntimeError):
    """A download that did not complete; the message says why and what to do."""


class UnreachableError(DownloadError):
    """The server cannot be reached (no network, DNS, refused, timeout)."""


class InterruptedDownloadError(DownloadError):
    """The transfer stopped part-way; the .part file is kept for the next run to resume."""


class ChecksumMismatchError(DownloadError, ValueError):
    """The file's sha256 is not the expected one."""


@dataclass
class Response:
    """What `fetch` returns. status: 200 (the whole file), 206 (from the requested byte on), or 416
    (nothing past the requested byte: the .part is complete). total: the full file size, if known."""

    status: int
    total: Optional[int]
    chunks: Iterable[bytes]


def fetch(url: str, start: int, timeout: float = 60.0) -> Response:
    """GET `url` from byte `start` with urllib (a Range header when start > 0). Errors propagate:
    urllib.error.HTTPError for an HTTP status, URLError / OSError when the server cannot be reached."""
    headers = {"User-Agent": "loralib-download"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:
            return Response(416, _size_from_content_range(e.headers.get("Content-Range")), iter(()))
        raise
    if resp.status == 206:
        total = _size_from_content_range(resp.headers.get("Content-Range"))
    else:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None

    def chunks():
        with resp:
            while True:
                block = resp.read(CHUNK_BYTES)
                if not block:
                    return
                yield block

    return Response(resp.status, total, chunks())


def _size_from_content_range(value: Optional[str]) -> Optional[int]:
    """'bytes 100-999/1000' or 'bytes */1000' -> 1000; None when absent or '*'."""
    if not value or "/" not in value:
        return None
    size = value.rsplit("/", 1)[1].strip()
    return int(size) if size.isdigit() else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Errors that mean "cannot reach the server" (before any byte) or "the transfer broke" (after some).
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, socket.gaierror,
                   http.client.HTTPException, OSError)


def download_adapter(name: str, dest: os.PathLike | str = DEFAULT_DEST, registry: Optional[Registry] = None,
                     log: Callable[[str], None] = print) -> Path:
    """Download the registry's adapter `name` into `dest` and return the file's path (see the module
    docstring). Raises UnknownAdapterError, UnreachableError, InterruptedDownloadError,
    ChecksumMismatchError or DownloadError, each with a one-line message."""
    adapter = (registry or load_registry()).adapter(name)
    dest = Path(dest)
    final = dest / adapter.filename
    part = final.with_name(final.name + ".part")
    record = final.with_name(final.name + ".sha256")
    if final.is_file():  # an earlier download, or a copy made by other means
        expected = _expected_sha256(adapter, record)
        digest = _check_checksum(adapter, final, expected, part=None)
        if expected is None:
            _write_atomic(record, f"{digest}  {final.name}\n")
            log(f"{final}: already there; sha256 {digest} recorded in {record}")
        else:
            log(f"{final}: already there, sha256 checked")
        return final

    start = part.stat().st_size if part.is_file() else 0
    try:
        response = fetch(adapter.url, start)  # looked up at call time: tests replace it
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {adapter.name}: {adapter.url} answered HTTP {e.code} {e.reason}") from None
    except _NETWORK_ERRORS as e:
        host = urllib.request.urlparse(adapter.url).hostname
        raise UnreachableError(f"cannot download {adapter.name}: {host} is unreachable from this machine "
                               f"({_reason(e)}); copy {adapter.url} to {final} by other means") from None

    if response.status == 206:
        mode = "ab" if start > 0 else "wb"
        if start > 0:
            log(f"resuming {adapter.filename} at byte {start}" + (f" of {response.total}" if response.total else ""))
    elif response.status == 200:
        mode, start = "wb", 0   # the whole file: start over, whatever the .part held
    elif response.status == 416 and start > 0:
        mode = None             # nothing left to fetch: the .part is the whole file
    else:
        raise DownloadError(f"cannot download {adapter.name}: {adapter.url} answered HTTP {response.status}")

    if mode is not None:
        dest.mkdir(parents=True, exist_ok=True)  # only now: an offline attempt leaves nothing behind
        try:
            with open(part, mode) as f:
                for block in response.chunks:
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
        except _NETWORK_ERRORS as e:
            have = part.stat().st_size if part.is_file() else 0
            of = f" of {response.total}" if response.total else ""
            raise InterruptedDownloadError(f"download of {adapter.name} interrupted at byte {have}{of} "
                                           f"({_reason(e)}); run the same command again to resume") from None

    size = part.stat().st_size
    if response.total is not None and size != response.total:
        if size < response.total:
            raise InterruptedDownloadError(f"download of {adapter.name} stopped at byte {size} of "
                                           f"{response.total}; run the same command again to resume")
        part.unlink()
        raise DownloadError(f"download of {adapter.name}: {size} bytes received but the server announced "
                            f"{response.total}; the partial file was removed, run the command again")
    digest = _check_checksum(adapter, part, _expected_sha256(adapter, record), part=part)
    os.replace(part, final)
    if adapter.sha256 is None:
        _write_atomic(record, f"{digest}  {final.name}\n")
        log(f"sha256 {digest} (not in the registry; recorded in {record})")
    log(f"downloaded {final} ({size} bytes)")
    for problem in verify_keys(adapter, final):
        log(f"warning: {final.name}: {problem}")
    return final


def _expected_sha256(adapter: Adapter, record: Path) -> Optional[str]:
    """The registry's sha256, else the one an earlier download recorded next to the file."""
    if adapter.sha256:
        return adapter.sha256
    if record.is_file():
        fields = record.read_text().split()
        return fields[0].lower() if fields else None
    return None


def _check_checksum(adapter: Adapter, path: Path, expected: Optional[str], part: Optional[Path]) -> str:
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        if part is not None:
            part.unlink()
            raise ChecksumMismatchError(f"{adapter.name}: sha256 {digest} does not match the expected {expected}; "
                                        "the download was removed and no file kept")
        raise ChecksumMismatchError(f"{path}: sha256 {digest} does not match the expected {expected}; "
                                    "remove the file and download it again")
    return digest


def verify_keys(adapter: Adapter, path: Path) -> List[str]:
    """Problems with the file's keys and shapes against the registry ([] when all is as expected)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects beyond tensors
        return [f"cannot be read as a torch state dict ({type(e).__name__}); keys not checked"]
    for wrapper in adapter.wrappers:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        return [f"holds a {type(state).__name__}, not a dict of tensors; keys not checked"]
    prefix = adapter.strip_prefix
    if prefix:
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if hasattr(v, "shape")}
    problems = check_state_dict(adapter, state)
    if problems and not adapter.keys_verified:
        problems.append("the registry's expectation was inferred, not read from the file: "
                        "if the file is right, correct registry.json")
    return problems


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    text = str(reason).strip().splitlines()
    return text[0] if text and text[0] else type(e).__name__


def _print_list(registry: Registry) -> None:
    print(f"{'name':<32} {'base model':<30} {'task':<7} {'r':>3} {'alpha':>5}  sha256")
    for a in registry.adapters.values():
        print(f"{a.name:<32} {a.base_model:<30} {a.task:<7} {a.r:>3} {a.lora_alpha:>5g}  "
              f"{'known' if a.sha256 else 'unknown'}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="loralib download", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="adapter name, e.g. roberta_base_lora_mnli (see --list)")
    parser.add_argument("--dest", default=DEFAULT_DEST, help=f"folder for the file (default {DEFAULT_DEST})")
    parser.add_argument("--list", action="store_true", help="list the released adapters and exit")
    args = parser.parse_args(argv)
    if args.list:
        _print_list(load_registry())
        return 0
    if not args.name:
        parser.error("name the adapter to download (loralib download --list shows them)")
    try:
        download_adapter(args.name, args.dest)
    except (DownloadError, UnknownAdapterError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
