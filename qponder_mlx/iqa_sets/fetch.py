"""Downloads from the Hugging Face Hub, with every failure turned into one line a user can act on.

Small label files go through `hf_hub_download` (the shared HF cache: cached, works offline once
fetched). Archives are large (KonIQ 6.35 GB, SPAQ 34.8 GB) and an interrupted one must resume in
the next run: huggingface_hub 2.4 retries with HTTP Range inside one call, but on failure it
deletes its process-unique temporary file (file_download.py `_download_to_tmp_and_move`), so a
Ctrl-C or a dropped connection starts over. `download_archive` therefore streams into our own
`<name>.part` and asks for `Range: bytes=<have>-` on the next run. Everything else is
huggingface_hub's: `hf_hub_url` (HF_ENDPOINT mirrors), `get_hf_file_metadata` (size and the LFS
sha256 etag), `build_hf_headers` (HF_TOKEN), `get_session` (proxies, and HF_HUB_OFFLINE, which
makes any request raise `OfflineModeIsEnabled`). An archive already in the HF cache (fetched by
pyiqa or `hf download`) is used as is.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from qponder_mlx.io import file_sha256
from qponder_mlx.iqa_sets.catalog import human_bytes
from qponder_mlx.iqa_sets.extract import is_disk_full

_RESUME = " — rerun the same command to resume"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DataError(RuntimeError):
    """A one-line, user-fixable problem with getting a data set."""


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def explain(e: BaseException, what: str, endpoint: str | None = None) -> DataError:
    """The one-line message for an exception raised while fetching `what` (repo/file); the
    cause comes from `hub_errors.classify`, the words and fixes are the data sets' own."""
    from qponder_mlx.hub_errors import classify

    host = _endpoint(endpoint)
    f = classify(e)
    if f.kind == "disk_full" or is_disk_full(e):
        return DataError(f"disk full while writing {what} — free space or pass --out on a "
                         f"bigger disk{_RESUME}")
    if f.kind == "offline":
        return DataError(f"offline (HF_HUB_OFFLINE is set) and {what} is not in the Hugging "
                         "Face cache — unset HF_HUB_OFFLINE to download it")
    if f.kind == "gated":
        return DataError(f"{what}: the repository is gated — accept its terms at "
                         f"{host}/datasets/{what.split('/')[0]}/{what.split('/')[1]} and set "
                         "HF_TOKEN")
    if f.kind == "not_found":
        return DataError(f"not found on {host}: the repository of {what} (private, renamed, or "
                         "HF_ENDPOINT points at a mirror without it)")
    if f.kind in ("revision", "entry"):
        return DataError(f"not found on {host}: {what} (the mirror may have renamed it; "
                         "`qponder data list` shows what we expect)")
    if f.kind == "http":
        hint = " — check HF_TOKEN" if f.status in (401, 403) else ""
        return DataError(f"HTTP {f.status if f.status is not None else '?'} from {host} for "
                         f"{what}{hint}")
    if f.kind == "unreachable":
        return DataError(f"cannot reach {host} ({f.detail[:120]}) — check the network, a proxy, "
                         "or HF_ENDPOINT")
    if f.kind == "interrupted":
        return DataError(f"download of {what} interrupted ({f.detail[:120]}){_RESUME}")
    return DataError(f"{what}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")


def fetch_small(repo: str, filename: str, *, endpoint: str | None = None,
                cache_dir: Path | None = None) -> Path:
    """A label file through the HF cache: the Hub's current version when it answers, the cached
    one when it does not (offline, unreachable), else a one-line error.

    One HEAD without retries comes first: `hf_hub_download` alone retries a refused connection
    five times with backoff (1+2+4+8+8 s, measured 24 s against a closed port) and logs a
    warning line per try, where a user should get one line at once.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    what = f"{repo}/{filename}"
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename, repo_type="dataset", endpoint=endpoint),
                             endpoint=endpoint)
    except Exception as e:  # every hub/network failure becomes one line
        cached = cached_archive(repo, filename, cache_dir)
        if cached is not None and not _is_missing(e):
            return cached
        raise explain(e, what, endpoint) from e
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", endpoint=endpoint,
                                    cache_dir=cache_dir))
    except Exception as e:  # every hub/network failure becomes one line
        raise explain(e, what, endpoint) from e


def _is_missing(e: BaseException) -> bool:
    """The Hub answered that the file or repo is gone (not: could not be asked)."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    if isinstance(e, EntryNotFoundError):
        return True
    return isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", 0) == 404


def cached_archive(repo: str, filename: str, cache_dir: Path | None = None) -> Path | None:
    """The file's path in the HF cache if a previous `hf_hub_download` left it there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", cache_dir=cache_dir,
                                    local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def remote_size(repo: str, filename: str, *, endpoint: str | None = None) -> int | None:
    """The file's size on the Hub (None if the Hub does not say), or a one-line DataError."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        url = hf_hub_url(repo, filename, repo_type="dataset", endpoint=endpoint)
        return get_hf_file_metadata(url, endpoint=endpoint).size
    except Exception as e:  # every hub/network failure becomes one line
        raise explain(e, f"{repo}/{filename}", endpoint) from e


def download_archive(repo: str, filename: str, dest: Path, *, endpoint: str | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     free_bytes: Callable[[Path], int] | None = None,
                     need_after: int = 0) -> Path:
    """Download `repo/filename` to `dest`, resuming `dest.with_suffix('.part')` if present.

    `progress(done, total)` after each chunk. `need_after`: bytes the caller will also need on
    this disk once the download is done (the extracted files) — checked before the first byte.
    Raises DataError (one line) for offline, unreachable, not found, disk full and interrupted.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    what = f"{repo}/{filename}"
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        url = hf_hub_url(repo, filename, repo_type="dataset", endpoint=endpoint)
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    except Exception as e:  # every hub/network failure becomes one line
        raise explain(e, what, endpoint) from e
    total = meta.size
    have = part.stat().st_size if part.exists() else 0
    if total is not None and have > total:
        part.unlink()  # not a prefix of this file (changed upstream): start over
        have = 0
    if total is not None:
        free = (free_bytes or _free)(dest.parent)
        need = total - have + need_after
        if free < need:
            raise DataError(f"disk full: {dest.parent} has {human_bytes(free)} free, "
                            f"{what} needs {human_bytes(need)} (download + unpacked) — free "
                            "space or pass --out on a bigger disk")
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # byte ranges of the stored file, not of a gzip
    if have:
        headers["Range"] = f"bytes={have}-"
    done = have
    try:
        if total is None or have < total:
            with get_session().stream("GET", meta.location, headers=headers,
                                      follow_redirects=True) as r:
                if r.status_code == 416 and have:
                    pass  # the server says we have it all already; checked below
                else:
                    from huggingface_hub.utils import hf_raise_for_status

                    hf_raise_for_status(r)
                    mode = "ab" if (have and r.status_code == 206) else "wb"
                    done = have if mode == "ab" else 0
                    with open(part, mode) as f:
                        for chunk in r.iter_bytes():  # as it arrives: a drop keeps it
                            f.write(chunk)
                            done += len(chunk)
                            if progress is not None:
                                progress(done, total or done)
    except Exception as e:  # network drop, disk full, HTTP errors: one line, .part kept
        err = explain(e, what, endpoint)
        if part.exists() and part.stat().st_size:
            kept = human_bytes(part.stat().st_size)
            base = str(err).removesuffix(_RESUME)
            raise DataError(f"{base} (kept {kept} in {part}){_RESUME}") from e
        raise err from e
    size = part.stat().st_size if part.exists() else 0
    if total is not None and size != total:
        raise DataError(f"download of {what} interrupted: {human_bytes(size)} of "
                        f"{human_bytes(total)} in {part} — rerun the same command to resume")
    etag = (meta.etag or "").strip('"').lower()
    if _SHA256.match(etag) and file_sha256(part) != etag:
        part.unlink()
        raise DataError(f"{what}: checksum mismatch (sha256 is not the Hub's {etag[:12]}…) — "
                        "the partial file was deleted; rerun to download again")
    os.replace(part, dest)
    return dest


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free
