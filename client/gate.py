"""The hospital's gate around every ClientApp process: approved code only, and an audit line per message sent.

``medfed-clientapp`` stands in for Flower's ``flwr-clientapp`` at a hospital (the hospital daemon's SuperExec
launches it for every message). Before Flower installs or imports anything from the app bundle (FAB) it checks
that the bundle's sha256 (recomputed from its bytes, not taken from the SuperLink's word) is in the site config's
``approved_apps``; anything else is refused with a PHI-free reason the coordinator sees, and the refusal is
written to the audit log. Every reply the site sends is recorded first in ``STATE/audit.jsonl``: time, direction,
run, round, message type and final stage, the digest of the model it answers, size in bytes, sha256 (Flower's
content address of the message), every scalar value it sends (never images or weights), the epsilon it reports,
a refusal's kind and reason, and the layout of its records (names, kinds and sizes).

This module wraps two functions of Flower's ClientApp runner (``pull_task_input`` and ``push_message``) and
otherwise runs Flower's own process unchanged. It lives outside the app bundle, so a bundle cannot switch it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.common import keys
from medfed.common.environment import flower_environment
from medfed.common.errors import ConfigError

__all__ = ["AUDIT_FILE", "UnapprovedApp", "append_audit", "audit_entry", "main", "model_sha256", "read_audit"]

logger = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"


class UnapprovedApp(ConfigError):
    """The coordinator asked this hospital to run an app bundle its site config does not approve."""

    def __init__(self, site_id: str, fab_hash: str) -> None:
        super().__init__(
            f"Hospital {site_id} refused app bundle sha256 {fab_hash}: it is not in approved_apps of the site's "
            "config. The hospital must review it and run `medfed hospital approve`, or the coordinator must launch "
            "an approved bundle."
        )


def append_audit(path: Path, entry: dict[str, Any]) -> None:
    """Append one line to an audit log (one write with O_APPEND, fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)  # one write of one line with O_APPEND: concurrent processes never interleave lines
        os.fsync(fd)
    finally:
        os.close(fd)


def read_audit(state_dir: Path) -> list[dict[str, Any]]:
    """Every entry of a site's audit log, oldest first (a line that is not JSON, e.g. torn by a crash mid-write, is
    skipped with a warning naming its line number)."""
    path = Path(state_dir) / AUDIT_FILE
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s line %d is not a JSON entry (torn by a crash?): skipped", AUDIT_FILE, number)
    return entries


def _layout(message: Any) -> dict[str, Any]:
    """Record names, kinds and sizes of a message's content (never values)."""
    if message.has_error():
        return {}
    out: dict[str, Any] = {}
    for name, record in message.content.items():
        kind = type(record).__name__
        if kind == "ArrayRecord":
            out[name] = {"kind": kind, "arrays": len(record), "elements": int(sum(a.numpy().size for a in record.values()))}
        elif kind == "MetricRecord":
            out[name] = {"kind": kind, "keys": sorted(record.keys())}
        else:
            out[name] = {"kind": kind, "keys": sorted(record.keys()),
                         "types": sorted({type(v).__name__ for v in record.values()})}
    return out


def model_sha256(message: Any) -> str | None:
    """A digest of the model a request carries (every array's name, dtype, shape and bytes, in order), so probing
    with crafted models can be seen afterwards; None for a request without arrays."""
    if message.has_error() or not message.content.array_records:
        return None
    digest = hashlib.sha256()
    for name, record in sorted(message.content.array_records.items()):
        for key, array in record.items():
            values = array.numpy()
            digest.update(f"{name}/{key}/{values.dtype.str}/{values.shape}".encode())
            digest.update(values.tobytes())
    return digest.hexdigest()


def _values(message: Any) -> dict[str, Any]:
    """Every scalar a reply sends (metric values and the site id; never arrays)."""
    if message.has_error():
        return {}
    out: dict[str, Any] = {}
    for record in message.content.metric_records.values():
        out.update({key: value for key, value in record.items()})
    for record in message.content.config_records.values():
        out.update({key: value for key, value in record.items() if isinstance(value, (str, int, float, bool))})
    return out


def audit_entry(
    message: Any, *, site_id: str, server_round: int | None = None, stage: str | None = None,
    received_model: str | None = None,
) -> dict[str, Any]:
    """The audit line of one outgoing message: size and sha256 of what goes on the wire, the model it answers
    (``received_model``: :func:`model_sha256` of the request), every scalar it sends, the epsilon it reports and
    what its releases charged, and a refusal's kind and reason."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(message)
    size = sum(len(obj.deflate()) for obj in objects.values())
    epsilon = charged = None
    if not message.has_error():
        for record in message.content.metric_records.values():
            if keys.EPSILON in record:
                epsilon = float(record[keys.EPSILON])
            if keys.EPSILON_CHARGED in record:
                charged = float(record[keys.EPSILON_CHARGED])
    reason = message.error.reason if message.has_error() else None
    refusal = keys.site_refusal(reason) if reason else None
    return {
        "time": time.time(),
        "event": "sent",
        "direction": "out",
        "site": site_id,
        "run": int(message.metadata.run_id),
        "round": server_round,
        "stage": stage or message.metadata.message_type,  # train | evaluate, or the final stage it answers
        "type": message.metadata.message_type,
        "bytes": int(size),
        "sha256": message.object_id,
        "epsilon": epsilon,
        "epsilon_charged": charged,
        "received_model": received_model,
        "values": _values(message),
        "error": reason,
        "refusal": refusal.value if refusal is not None else None,
        "records": _layout(message),
    }


def _site_of(context: Any) -> tuple[Any, Path]:
    from medfed.client.site import load_site_config

    if keys.NODE_SITE_CONFIG not in context.node_config:
        raise ConfigError(
            "medfed-clientapp runs only under a hospital daemon (`medfed hospital start`): the node config has no "
            "'site-config'."
        )
    site = load_site_config(Path(str(context.node_config[keys.NODE_SITE_CONFIG])))
    return site, site.state_path / AUDIT_FILE


class _Gate:
    """Checks the bundle when Flower pulls a task, and stops Flower's install of a refused one.

    The refusal is raised from the install step, after the message has been pulled, so Flower replies to the
    coordinator with an error message carrying the reason (raised earlier, no reply would be sent at all).
    """

    def __init__(self) -> None:
        self.refusal: UnapprovedApp | None = None
        self.round: int | None = None  # the server round of the message being answered
        self.stage: str | None = None  # or the final stage it asks for
        self.site: tuple[Any, Path] | None = None  # the site config and audit file, read once per message
        self.received_model: str | None = None  # the digest of the model the request carries

    def pull(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def pull_task_input(client: Any) -> Any:
            message, context, run, fab = original(client)
            self.round, self.stage = _server_round(message), _final_stage(message)
            self.received_model = model_sha256(message)
            self.site = _site_of(context)
            site, audit = self.site
            content_hash = hashlib.sha256(fab.content).hexdigest()
            if content_hash != fab.hash_str or not site.approves(content_hash):
                append_audit(audit, {"time": time.time(), "event": "refused-app", "site": site.site_id,
                                "run": int(run.run_id), "fab_sha256": content_hash, "claimed_sha256": fab.hash_str})
                logger.error("refused app bundle %s for run %s: not approved", content_hash, run.run_id)
                self.refusal = UnapprovedApp(site.site_id, content_hash)
            return message, context, run, fab

        return pull_task_input

    def install(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def install_from_fab(*args: Any, **kwargs: Any) -> Any:
            if self.refusal is not None:
                raise self.refusal
            return original(*args, **kwargs)

        return install_from_fab


    def push(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def push_message(client: Any, message: Any, context: Any) -> Any:
            site, audit = self.site if self.site is not None else _site_of(context)
            append_audit(audit, audit_entry(message, site_id=site.site_id, server_round=self.round, stage=self.stage,
                                            received_model=self.received_model))
            return original(client, message, context)

        return push_message


def _server_round(message: Any) -> int | None:
    """The server round a request names (Flower's strategies put it in the ``config`` record), if any."""
    try:
        record = message.content.config_records.get(keys.CONFIG)
        return int(record[keys.SERVER_ROUND]) if record is not None and keys.SERVER_ROUND in record else None
    except (TypeError, ValueError, AttributeError):
        return None


def _final_stage(message: Any) -> str | None:
    """The final stage a request asks for (calibration after the last round), if any."""
    try:
        record = message.content.config_records.get(keys.CONFIG)
        return str(record[keys.FINAL_STAGE]) if record is not None and keys.FINAL_STAGE in record else None
    except (TypeError, AttributeError):
        return None


def main() -> None:
    """Entry point of ``medfed-clientapp``: Flower's ``flwr-clientapp`` with the gate in front of it."""
    flower_environment()
    import importlib

    # the modules (the package re-exports a function), typed Any: their functions are replaced below
    cli: Any = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    runner: Any = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    gate = _Gate()
    runner.pull_task_input = gate.pull(runner.pull_task_input)
    runner.install_from_fab = gate.install(runner.install_from_fab)
    runner.push_message = gate.push(runner.push_message)
    cli.run_clientapp = runner.run_clientapp
    cli.flwr_clientapp()
