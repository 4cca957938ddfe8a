"""Fetch pretrained weights once, on purpose, into a local file that runs then name with ``model.pretrained=``.

Runs never download: a coordinator's first global model must come from a file the operator chose and can keep
(reproducible, and a hospital network may have no internet). ``medfed weights fetch`` is the one place that goes
online. It takes a known name (``torchvision:resnet18``, ...) or any ``https://``, ``http://`` or ``file://`` URL,
writes the file into a weights directory (``~/.cache/medfed/weights``, or ``$MEDFED_WEIGHTS_DIR``), checks the
SHA-256 prefix that hub file names carry (``resnet18-f37072fd.pth``), checks that the file holds torch weights, and
returns its path. A file already there is not fetched again. Offline, the error says how to bring the file in by
hand.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import unquote, urlparse

from medfed.common.errors import ConfigError

__all__ = ["KNOWN_WEIGHTS", "default_weights_dir", "fetch_weights", "resolve_weights_url"]

logger = logging.getLogger(__name__)

# torchvision's ImageNet ResNet weights (the V1 weights; their names end in the SHA-256 prefix)
KNOWN_WEIGHTS = {
    "torchvision:resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "torchvision:resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
}
_SCHEMES = ("https", "http", "file")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


def default_weights_dir() -> Path:
    """``$MEDFED_WEIGHTS_DIR``, else ``~/.cache/medfed/weights``."""
    return Path(os.environ.get("MEDFED_WEIGHTS_DIR") or Path.home() / ".cache" / "medfed" / "weights").expanduser()


def resolve_weights_url(spec: str) -> str:
    """The URL of a known name, or ``spec`` itself when it is an http(s)/file URL.

    Raises:
        ConfigError: neither (the message lists the known names and the accepted schemes).
    """
    url = KNOWN_WEIGHTS.get(spec, spec)
    parsed = urlparse(url)
    if parsed.scheme not in _SCHEMES or not parsed.path or parsed.path.endswith("/"):
        raise ConfigError(
            f"{spec!r} is neither a known weights name ({', '.join(sorted(KNOWN_WEIGHTS))}) nor a URL of a file "
            f"({'/'.join(_SCHEMES)}://...). For a file already on this machine, skip fetching: model.pretrained=PATH."
        )
    return url


def fetch_weights(
    spec: str, directory: Path | None = None, *, progress: bool = False, timeout_s: float = 60.0
) -> Path:
    """Download the weights ``spec`` names into ``directory`` (default :func:`default_weights_dir`) and return the
    local file; a file of that name already there and readable is returned without a download.

    Raises:
        ConfigError: an unknown name or URL; the download failed (offline: how to bring the file in by hand); the
            file's SHA-256 does not start with the prefix in its name; or it holds no torch weights.
    """
    from torch.hub import download_url_to_file

    from medfed.common.models.pretrained import read_state_dict

    url = resolve_weights_url(spec)
    name = Path(unquote(urlparse(url).path)).name
    directory = Path(directory or default_weights_dir()).expanduser()
    target = directory / name
    if target.is_file():
        read_state_dict(target)  # a usable file is kept; a broken one is an error, never silently replaced
        logger.info("%s is already in %s", name, directory)
        return target
    directory.mkdir(parents=True, exist_ok=True)
    match = _HASH_IN_NAME.search(name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # a network that drops packets fails instead of hanging
    try:
        download_url_to_file(url, str(target), hash_prefix=match.group(1) if match else None, progress=progress)
    except RuntimeError as exc:  # torch.hub's hash check (it writes a temporary file, moved to target on success only)
        raise ConfigError(
            f"The file fetched from {url} does not match the SHA-256 prefix in its name ({exc}); it was deleted. "
            "Fetch it again, or check the URL."
        ) from None
    except OSError as exc:  # URLError, connection refused, DNS failure, no such local file
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ConfigError(
            f"Could not fetch {url} ({reason}). Offline? Download the file on a machine with internet, copy it "
            f"here, and pass model.pretrained=/path/to/{name} (medfed never downloads during a run)."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    try:
        read_state_dict(target)
    except ConfigError:
        target.unlink(missing_ok=True)
        raise
    logger.info("fetched %s into %s", url, target)
    return target
