"""Downloadable encoder weights (``model.encoder_weights: imagenet``, a ``tu-`` encoder's timm
weights), checked before smp or timm reach for the network.

smp and timm download pretrained weights from the Hugging Face hub; without a network
huggingface_hub retries for about half a minute before it fails. :func:`require_weights`
answers first, from the local cache:

- every file of the weights is cached: nothing is downloaded (smp pins a commit, so the cache
  answers alone; timm asks the hub for ``main``, so when the hub cannot be reached the
  cached files are used in offline mode instead of waiting for the retries);
- not cached and ``HF_HUB_OFFLINE=1``: one error at once;
- not cached: one connection to the hub's host (``HF_ENDPOINT``, default huggingface.co),
  at most :data:`PROBE_TIMEOUT_S` seconds, name resolution included; no answer -> one error
  naming the encoder, the weights, the cache searched and the fix (a local weights file,
  README: offline pretrained weights; or ``null``); an answer -> smp/timm download them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from ptxseg.errors import ConfigError

PROBE_TIMEOUT_S = 3.0
FIX = (
    "set model.encoder_weights to a local weights file (README: offline pretrained weights) "
    "or null"
)


@dataclass(frozen=True)
class Source:
    """Where a library downloads the weights from: a hub repository (``files`` in it, at
    ``revision``; ``None`` = ``main``) or a URL (cached by file name in ``torch.hub``'s folder)."""

    kind: str  # "hf" or "url"
    where: str  # repo id or URL
    files: tuple[str, ...] = ()
    revision: str | None = None


def weights_source(encoder: str, weights: str | None) -> Source | None:
    """The download behind ``encoder`` with ``weights`` (``None``: nothing to download, or a
    combination smp itself refuses)."""
    if weights is None:
        return None
    if encoder.startswith("tu-"):
        import timm

        cfg = timm.models.get_pretrained_cfg(encoder[3:])
        if cfg is None:
            return None
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        hub_id = cfg.get("hf_hub_id")
        if hub_id:
            repo, _, revision = hub_id.partition("@")
            files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else (
                "model.safetensors", "pytorch_model.bin")  # fmt: skip
            return Source("hf", repo, files, revision or None)
        return Source("url", cfg["url"]) if cfg.get("url") else None
    import segmentation_models_pytorch as smp

    entry = smp.encoders.encoders.get(encoder, {})
    settings = entry.get("pretrained_settings", {}).get(weights)
    if not settings or "repo_id" not in settings:
        return None
    return Source("hf", settings["repo_id"], ("config.json", "model.safetensors"),
                  settings.get("revision"))  # fmt: skip


def _hf_cached(source: Source) -> bool:
    """smp needs every file (config + weights); timm any one of its candidates."""
    from huggingface_hub import try_to_load_from_cache

    found = [
        isinstance(try_to_load_from_cache(source.where, f, revision=source.revision), str)
        for f in source.files
    ]
    return all(found) if "config.json" in source.files else any(found)


def is_cached(source: Source) -> bool:
    """Whether the weights are in the local cache (nothing to download)."""
    if source.kind == "hf":
        return _hf_cached(source)
    import torch

    name = os.path.basename(urlparse(source.where).path)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", name))


def host(source: Source) -> tuple[str, int]:
    """The host and port a download would connect to (``HF_ENDPOINT`` for the hub)."""
    if source.kind == "hf":
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
    else:
        url = urlparse(source.where)
    return url.hostname or "", url.port or (80 if url.scheme == "http" else 443)


def reachable(address: tuple[str, int], timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to ``address`` within ``timeout`` seconds, name resolution
    included (in a daemon thread: a stuck resolver does not hold the caller)."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, name="ptxseg-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode for the block (cached files, no request)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _where(source: Source) -> str:
    if source.kind == "hf":
        from huggingface_hub import constants

        return f"{source.where} in the Hugging Face cache {constants.HF_HUB_CACHE}"
    import torch

    return f"{os.path.basename(urlparse(source.where).path)} in {torch.hub.get_dir()}"


@contextlib.contextmanager
def require_weights(encoder: str, weights: str | None) -> Iterator[None]:
    """Around building a network with downloadable ``weights`` for ``encoder``: the fast
    answer of the module doc.

    Raises:
        ConfigError: the weights are not cached and cannot be downloaded (offline mode, or
            the host gave no answer in :data:`PROBE_TIMEOUT_S` seconds).
    """
    source = weights_source(encoder, weights)
    if source is None:
        yield
        return
    what = f"model.encoder_weights: '{weights}' weights of {encoder} ({_where(source)})"
    if is_cached(source):
        pinned = source.kind == "url" or len(source.revision or "") == 40  # a commit
        if pinned or _offline() or reachable(host(source)):
            yield
        else:  # cached, hub unreachable: timm would ask the hub for "main" and retry
            with _hub_offline():
                yield
        return
    if _offline():
        raise ConfigError(f"{what} are not cached and HF_HUB_OFFLINE=1 forbids downloading "
                          f"them; {FIX}")  # fmt: skip
    address = host(source)
    if not reachable(address):
        raise ConfigError(
            f"{what} are not cached and {address[0]} cannot be reached (no answer in "
            f"{PROBE_TIMEOUT_S:g} s); offline, {FIX}"
        )
    yield
