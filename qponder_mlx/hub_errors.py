"""What went wrong when something could not come from the Hugging Face hub, in one line.

huggingface_hub raises different exceptions for "offline mode is on", "no network", "no such
repo", "gated" and "server error", but `snapshot_download` folds a failed connection into the
same `LocalEntryNotFoundError` it raises in offline mode; the real cause is in the exception's
chain. `describe` walks the chain and names the cause with its fix, so a user without network
is not told to check a name that is right.
"""

from __future__ import annotations

import os

OFFLINE_HINT = ("pass a local folder (--model /path/to/model), run once with network to fill "
                "the cache, or try everything offline with `qponder dev tiny-model DIR`")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_connection_error(exc: BaseException) -> bool:
    import httpx

    names = {type(e).__name__ for e in type(exc).__mro__}
    return (isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError))
            or bool(names & {"ConnectError", "ConnectTimeout", "ReadTimeout",
                             "RemoteProtocolError"}))


def describe(what: str, exc: BaseException) -> str:
    """`what` (e.g. "mlx-community/X") could not be fetched because of `exc`: the cause and the
    fix, one line, no traceback."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, GatedRepoError):
            return (f"{what}: the repo is gated — accept its terms on huggingface.co, then "
                    "export HF_TOKEN=<a token with access>")
        if isinstance(e, RepositoryNotFoundError):
            return (f"{what}: no such repo on the Hugging Face hub (or it is private: export "
                    "HF_TOKEN) — check the name")
        if isinstance(e, RevisionNotFoundError):
            return f"{what}: the hub has no such revision — check the name"
        if isinstance(e, OfflineModeIsEnabled):
            break
    for e in chain:
        if isinstance(e, HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status is not None and status >= 500:
                return (f"{what}: the Hugging Face hub answered HTTP {status} (a server error) "
                        "— try again later")
            if status in (401, 403):
                return (f"{what}: the hub refused access (HTTP {status}) — check HF_TOKEN")
            return f"{what}: the hub answered HTTP {status} ({type(e).__name__})"
        if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
            return f"{what}: the disk is full (while downloading) — free space and rerun"
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true")
    if offline and any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled))
                       for e in chain):
        return (f"{what}: not in the local Hugging Face cache and offline mode is on "
                f"(HF_HUB_OFFLINE=1) — {OFFLINE_HINT}")
    if any(_is_connection_error(e) for e in chain) or any(
            isinstance(e, LocalEntryNotFoundError) for e in chain):
        return (f"{what}: cannot reach the Hugging Face hub at {constants.ENDPOINT} (no network?) "
                f"and it is not in the local cache — {OFFLINE_HINT}")
    detail = " ".join(str(exc).split())[:200]
    return f"{what}: could not fetch from the Hugging Face hub ({type(exc).__name__}: {detail})"
