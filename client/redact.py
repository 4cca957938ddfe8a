"""What a hospital's error text may carry when it leaves the site: no paths and no file names.

Flower forwards an exception's text to the coordinator. medfed's own errors are written without patient data, but
a message can still name a file or a folder of the hospital (a site config's location, a manifest, an image).
:func:`public_text` replaces every path and every file name in a text with a placeholder before it leaves; the
full text stays in the hospital's local log. medfed's fixed file names (``site.yaml``, ``node.key`` ...) and web
addresses are kept: they say how to fix the problem and carry nothing of the site.
"""

from __future__ import annotations

import re

__all__ = ["public_text"]

# medfed's own file names: instructions, not site data
_KEPT = {"site.yaml", "config.yaml", "node.key", "node.pub", "ca.crt", "audit.jsonl", "metrics.jsonl",
         "summary.json", "pyproject.toml"}
_URL = re.compile(r"https?://\S+")
_WINDOWS = re.compile(r"\b[A-Za-z]:\\[^\s'\"<>|]*")
_PATH = re.compile(r"(?:~|\.{1,2})?/?(?:[\w.@+-]+/)+[\w.@+-]*|(?<![\w.])/[\w.@+-]+")
_FILE = re.compile(r"\b[\w@+-][\w.@+-]*\.(?:dcm|dicom|nii\.gz|nii|png|jpe?g|tiff?|bmp|npz|npy|csv|tsv|txt|ya?ml"
                   r"|json|jsonl|pt|pth|ckpt|key|pub|crt|pem|h5|hdf5|zip|gz|tar|db)\b", re.IGNORECASE)


def public_text(text: str) -> str:
    """``text`` with every path replaced by ``<path>`` and every file name by ``<file>`` (medfed's fixed file names
    and web addresses kept)."""
    urls: list[str] = []

    def keep_url(match: re.Match[str]) -> str:
        urls.append(match.group(0))
        return f"\x00{len(urls) - 1}\x00"

    out = _URL.sub(keep_url, text)
    out = _WINDOWS.sub("<path>", out)
    out = _PATH.sub("<path>", out)  # every match holds a "/" (none of medfed's fixed file names does)
    out = _FILE.sub(lambda m: m.group(0) if m.group(0) in _KEPT else "<file>", out)
    return re.sub("\x00(\\d+)\x00", lambda m: urls[int(m.group(1))], out)
