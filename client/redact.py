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
# a quoted span: the quote opens and closes outside a word (the apostrophe of "hospital's" is no quote)
_QUOTED = re.compile(r"""(?<!\w)(['"])([^'"\n]{1,400})\1(?!\w)""")
_BACKSLASH = re.compile(r"[^\s<>'\"]*\\[^\s<>'\"]*")
# a path piece, then words without sentence punctuation, then a path piece that starts right after them (no space):
# `<path> John (1958)<path>` is one path, `<path> and <path>` two
_BETWEEN = re.compile(r"<path>[^\n;:.,<>'\"]*[^\s;:.,<>'\"](?:<(?:path|file)>|\\)")
_FILE = re.compile(r"\b[\w@+-][\w.@+-]*\.(?:dcm|dicom|nii\.gz|nii|png|jpe?g|tiff?|bmp|npz|npy|csv|tsv|txt|ya?ml"
                   r"|json|jsonl|pt|pth|ckpt|key|pub|crt|pem|h5|hdf5|zip|gz|tar|db)\b", re.IGNORECASE)


def public_text(text: str) -> str:
    """``text`` with every path replaced by ``<path>`` and every file name by ``<file>`` (medfed's fixed file names
    and web addresses kept). A quoted span holding a path separator or a file name goes whole, spaces and all; so do
    the words between two pieces of one path (a folder name with spaces, ``/data/Doe John/ct.dcm``) and a token
    with a backslash."""
    urls: list[str] = []

    def keep_url(match: re.Match[str]) -> str:
        urls.append(match.group(0))
        return f"\x00{len(urls) - 1}\x00"

    out = _URL.sub(keep_url, text)
    out = _QUOTED.sub(_quoted, out)
    out = _WINDOWS.sub("<path>", out)
    out = _merged(_PATH.sub("<path>", out))  # every match holds a "/" (none of medfed's fixed file names does)
    out = _BACKSLASH.sub("<path>", out)  # what is left of a Windows path with spaces in it
    out = _merged(_FILE.sub(lambda m: m.group(0) if m.group(0) in _KEPT else "<file>", out))
    return re.sub("\x00(\\d+)\x00", lambda m: urls[int(m.group(1))], out)


def _merged(text: str) -> str:
    """Two pieces of one path with the words between them (a folder name with spaces) as one ``<path>``."""
    while True:
        merged = _BETWEEN.sub("<path>", text)
        if merged == text:
            return text
        text = merged


def _quoted(match: re.Match[str]) -> str:
    inner = match.group(2)
    if "/" in inner or "\\" in inner:
        return f"{match.group(1)}<path>{match.group(1)}"
    if _FILE.search(inner) and inner not in _KEPT:
        return f"{match.group(1)}<file>{match.group(1)}"
    return match.group(0)
