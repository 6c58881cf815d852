"""What went wrong when something could not come from the Hugging Face hub.

huggingface_hub raises different exceptions for "offline mode is on", "no network", "no such
repo", "gated" and "server error", but `snapshot_download` and `hf_hub_download` fold a failed
connection into the same `LocalEntryNotFoundError` they raise in offline mode; the real cause is
in the exception's chain. `classify` walks the chain once and names the cause; each caller turns
that into its own one-line message with its own fix (`describe` for models; `qponder data get`
has its own words for data sets, qponder_mlx/iqa_sets/fetch.py).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

OFFLINE_HINT = ("pass a local folder (--model /path/to/model), run once with network to fill "
                "the cache, or try everything offline with `qponder dev tiny-model DIR`")

# Transport errors by class name: huggingface_hub 2.x ships its own httpx fork (httpx2), older
# versions use httpx; the names are the same in both.
_UNREACHABLE = {"ConnectError", "ConnectTimeout", "ConnectionError", "ConnectionRefusedError"}
_TRANSPORT = {"TransportError", "ReadTimeout", "ReadError", "RemoteProtocolError",
              "TimeoutException"}


@dataclass
class HubFailure:
    kind: str  # gated | not_found | revision | entry | http | offline | unreachable |
    #            interrupted | disk_full | other
    status: int | None = None  # the HTTP status (kind "http")
    cause: BaseException | None = None  # the innermost exception that says why

    @property
    def detail(self) -> str:
        c = self.cause
        return (" ".join(str(c).split()) or type(c).__name__)[:160] if c is not None else ""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _names(exc: BaseException) -> set[str]:
    return {t.__name__ for t in type(exc).__mro__}


def classify(exc: BaseException) -> HubFailure:
    """The cause of a failed hub fetch, from the whole exception chain."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return HubFailure("disk_full", cause=e)
        if isinstance(e, GatedRepoError):
            return HubFailure("gated", cause=e)
        if isinstance(e, RepositoryNotFoundError):
            return HubFailure("not_found", cause=e)
        if isinstance(e, RevisionNotFoundError):
            return HubFailure("revision", cause=e)
        if isinstance(e, RemoteEntryNotFoundError):
            return HubFailure("entry", cause=e)
    for e in chain:
        if isinstance(e, HfHubHTTPError):
            return HubFailure("http", getattr(getattr(e, "response", None), "status_code", None),
                              e)
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain) or (
            constants.is_offline_mode()
            and any(isinstance(e, LocalEntryNotFoundError) for e in chain)):
        return HubFailure("offline", cause=chain[-1])
    for e in chain:
        if _names(e) & _UNREACHABLE:
            return HubFailure("unreachable", cause=e)
    for e in chain:
        if _names(e) & _TRANSPORT:
            return HubFailure("interrupted", cause=e)
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return HubFailure("unreachable", cause=chain[-1])
    return HubFailure("other", cause=exc)


def describe(what: str, exc: BaseException) -> str:
    """`what` (a model repo id) could not be fetched because of `exc`: the cause and the fix,
    one line, no traceback."""
    from huggingface_hub import constants

    f = classify(exc)
    if f.kind == "gated":
        return (f"{what}: the repo is gated — accept its terms on huggingface.co, then "
                "export HF_TOKEN=<a token with access>")
    if f.kind == "not_found":
        return (f"{what}: no such repo on the Hugging Face hub (or it is private: export "
                "HF_TOKEN) — check the name")
    if f.kind in ("revision", "entry"):
        return f"{what}: the hub has no such revision or file — check the name"
    if f.kind == "http":
        if f.status is not None and f.status >= 500:
            return (f"{what}: the Hugging Face hub answered HTTP {f.status} (a server error) "
                    "— try again later")
        hint = " — check HF_TOKEN" if f.status in (401, 403) else ""
        return f"{what}: the hub answered HTTP {f.status}{hint}"
    if f.kind == "disk_full":
        return f"{what}: the disk is full (while downloading) — free space and rerun"
    if f.kind == "offline":
        return (f"{what}: not in the local Hugging Face cache and offline mode is on "
                f"(HF_HUB_OFFLINE=1) — {OFFLINE_HINT}")
    if f.kind in ("unreachable", "interrupted"):
        return (f"{what}: cannot reach the Hugging Face hub at {constants.ENDPOINT} (no network?) "
                f"and it is not in the local cache — {OFFLINE_HINT}")
    return f"{what}: could not fetch from the Hugging Face hub ({type(exc).__name__}: {f.detail})"
