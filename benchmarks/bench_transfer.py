"""Transfer throughput of the Jupyter backend over loopback, against plain curl (not a test).

One run starts a real jupyter_server (token auth) on loopback and measures, for one file of
`--size-mib` (default 1024 = 1 GiB):

- download: `JupyterBackend.download` vs `curl` of the same `/files/` URL (auth header from a
  curl config file, so the token is not in argv), each fetched `--repeats` times, median kept;
- upload: `JupyterBackend.put_file` (chunked contents-API PUTs, sha256 verified on the server,
  renamed into place) vs `curl -T` of the same bytes as one contents PUT is impossible (the API
  wants base64 JSON), so upload is reported as MiB/s on its own;
- a cut connection: the download repeated through `tests/faultproxy.py` cutting once mid-file;
  the bytes re-sent beyond the file size measure what a cut costs (target: at most one chunk).

Prints one JSON object (also written with `--json-out`). The targets from issue 4: download at
least 0.5x curl; a cut connection costs at most one chunk of re-transfer.

    python benchmarks/bench_transfer.py --size-mib 1024 --json-out /tmp/bench_transfer.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test server fixture and fault proxy

from faultproxy import FaultProxy  # noqa: E402
from jupyter_fixtures import start_jupyter_server  # noqa: E402

from versa_runner.backends.jupyter.backend import JupyterBackend  # noqa: E402
from versa_runner.backends.jupyter.http import UPLOAD_CHUNK_BYTES  # noqa: E402

MIB = 1 << 20


def write_random_file(path: Path, size_mib: int) -> None:
    """Incompressible bytes, written 64 MiB at a time."""
    block = os.urandom(64 * MIB)
    with open(path, "wb") as fh:
        left = size_mib * MIB
        while left:
            fh.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def curl_download(url: str, token: str, dest: Path, workdir: Path) -> None:
    config = workdir / "curl.cfg"  # the token goes in a 0600 file, never in curl's argv
    config.write_text(f'header = "Authorization: token {token}"\n')
    config.chmod(0o600)
    subprocess.run(["curl", "-sf", "-K", str(config), "-o", str(dest), url], check=True)


def _wire_bytes(
    port: int, url: str, token: str, direction: str, cuts: int, cut_at: int, work: Path,
    item: str | Path,
) -> int:  # fmt: skip
    """Bytes the proxy forwarded in `direction` for one download (str) or upload (Path)."""
    with FaultProxy(port, cut_after_bytes=cut_at, max_cuts=cuts, direction=direction) as proxy:  # type: ignore[arg-type]
        with JupyterBackend(proxy.url_for(url), token=token) as backend:
            if isinstance(item, Path):
                backend.put_file(item, f"uploaded/cut_{cuts}.bin")
            else:
                dest = work / f"cut_{cuts}.bin"
                backend.download(item, dest)
                if dest.stat().st_size != (Path(work / "server/root") / item).stat().st_size:
                    raise RuntimeError("resumed download has the wrong size")
                dest.unlink()
        if proxy.cuts != cuts:
            raise RuntimeError(f"expected {cuts} cut(s), the proxy made {proxy.cuts}")
        return proxy.bytes_forwarded[direction]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_transfer_"))
    token = secrets.token_hex(16)
    server = start_jupyter_server(work / "server", token=token)
    try:
        payload = server.root_dir / "payload.bin"
        write_random_file(payload, args.size_mib)
        size = payload.stat().st_size
        url = f"{server.url}/files/payload.bin"
        result: dict[str, object] = {"size_bytes": size, "repeats": args.repeats}

        runner_s, curl_s = [], []
        with JupyterBackend(server.url, token=token) as backend:
            for i in range(args.repeats):
                dest = work / f"runner_{i}.bin"
                runner_s.append(timed(lambda d=dest: backend.download("payload.bin", d)))
                dest.unlink()
                dest = work / f"curl_{i}.bin"
                curl_s.append(timed(lambda d=dest: curl_download(url, token, d, work)))
                dest.unlink()
            local = work / "upload.bin"
            os.replace(payload, local)
            upload_s = timed(lambda: backend.put_file(local, "uploaded/payload.bin"))
            os.replace(local, payload)

        runner_med, curl_med = statistics.median(runner_s), statistics.median(curl_s)
        result["download_runner_mib_s"] = round(size / MIB / runner_med, 1)
        result["download_curl_mib_s"] = round(size / MIB / curl_med, 1)
        result["download_ratio_vs_curl"] = round(curl_med / runner_med, 3)
        result["upload_runner_mib_s"] = round(size / MIB / upload_s, 1)
        result["upload_chunk_bytes"] = UPLOAD_CHUNK_BYTES

        port = int(server.url.rsplit(":", 1)[1])
        # Wire bytes through the proxy with no cut and with one cut mid-file: the difference is
        # what the cut cost in re-transfer (plus one request's HTTP framing).
        down = [_wire_bytes(port, server.url, token, "down", cuts, size // 2, work, "payload.bin")
                for cuts in (0, 1)]  # fmt: skip
        small = work / "small.bin"
        write_random_file(small, 64)
        cut_up = UPLOAD_CHUNK_BYTES * 5 // 2  # inside the third chunk's body
        up = [_wire_bytes(port, server.url, token, "up", cuts, cut_up, work, small)
              for cuts in (0, 1)]  # fmt: skip
        result["cut_download_extra_bytes"] = down[1] - down[0]
        result["cut_upload_extra_bytes"] = up[1] - up[0]
        result["upload_chunk_base64_bytes"] = -(-UPLOAD_CHUNK_BYTES // 3) * 4
        result["targets_met"] = bool(
            result["download_ratio_vs_curl"] >= 0.5  # type: ignore[operator]
            and result["cut_download_extra_bytes"] <= UPLOAD_CHUNK_BYTES  # type: ignore[operator]
            and result["cut_upload_extra_bytes"] <= 2 * UPLOAD_CHUNK_BYTES  # type: ignore[operator]
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # a 1 GiB payload is not left in /tmp
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
