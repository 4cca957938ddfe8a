"""Which app bundles a hospital runs: approving and revoking a bundle hash in the site config, audited.

`medfed hospital approve` / `revoke` and the hospital console both write through here, so the site config they
change is the same file and each change leaves the same audit line (who, through what, when)."""

from __future__ import annotations

import dataclasses
import getpass
import re
import time
from pathlib import Path
from typing import Any

from medfed.client.gate import AUDIT_FILE, append_audit, read_audit
from medfed.client.site import SiteConfig, load_site_config, write_site_config
from medfed.common.errors import ConfigError

__all__ = ["APPROVED", "REVOKED", "approval_history", "audit_approval", "set_approval", "valid_hash"]

APPROVED, REVOKED = "app-approved", "app-revoked"
_HASH = re.compile(r"[0-9a-f]{64}")


def valid_hash(digest: str) -> str:
    """``digest`` lower-cased, or a ConfigError saying what an app bundle hash looks like."""
    value = str(digest).strip().lower()
    if not _HASH.fullmatch(value):
        raise ConfigError(f"app bundle hash {str(digest)[:80]!r} is not a sha256: give the 64 hexadecimal characters "
                          "that `medfed hospital approve` prints (or `sha256sum` of the .fab file).")
    return value


def set_approval(config: Path, digest: str, *, approve: bool, via: str, by: str | None = None) -> bool:
    """Approve (or revoke) a bundle in the site config at ``config`` and audit it; returns whether the config
    changed (approving an approved bundle, or revoking one that is not, changes nothing and audits nothing)."""
    value = valid_hash(digest)
    site = load_site_config(config)
    listed = value in site.approved_apps
    if listed == approve:
        return False
    apps = [*site.approved_apps, value] if approve else [a for a in site.approved_apps if a != value]
    write_site_config(dataclasses.replace(site, approved_apps=apps), config)
    audit_approval(site, value, approve=approve, via=via, by=by)
    return True


def audit_approval(site: SiteConfig, digest: str, *, approve: bool, via: str, by: str | None = None) -> None:
    """The audit line of an approval or revocation written to ``site``'s config."""
    append_audit(site.state_path / AUDIT_FILE, {
        "time": time.time(), "event": APPROVED if approve else REVOKED, "site": site.site_id, "sha256": digest,
        "by": by or _user(), "via": via})


def approval_history(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The last approval or revocation the audit log records per bundle hash (who, through what, when)."""
    out: dict[str, dict[str, Any]] = {}
    for entry in read_audit(state_dir):
        if entry.get("event") in (APPROVED, REVOKED) and entry.get("sha256"):
            out[str(entry["sha256"])] = entry
    return out


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"
