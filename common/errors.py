"""Typed errors of medfed, each tied to a process exit code with a help text.

Every error message names what was wrong, the bad value, what is allowed and how to fix it. Messages never
carry patient data or absolute site paths: a site id and a file index are enough (details go to the local log).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatasetUnavailableError",
    "EXIT_CODES",
    "IncompatibleUpdateError",
    "MedfedError",
    "PolicyRefusal",
    "PrivacyBudgetExceeded",
    "RunFailed",
    "ServiceUnavailable",
    "SitOut",
    "SiteDataError",
]


class MedfedError(Exception):
    """Base class of every error medfed raises on purpose."""

    exit_code: int = 1


class ConfigError(MedfedError, ValueError):
    """A configuration value is missing, malformed or not among the allowed choices."""

    exit_code = 2


class DatasetUnavailableError(MedfedError, FileNotFoundError):
    """A dataset file is absent and cannot be downloaded (offline, or the downloader is not installed)."""

    exit_code = 3


class SiteDataError(MedfedError):
    """A hospital's data cannot be used (too few readable images, bad labels, ...)."""

    exit_code = 4


class IncompatibleUpdateError(MedfedError):
    """A model update does not fit the global model (keys, shapes or dtypes differ)."""

    exit_code = 5


class PrivacyBudgetExceeded(MedfedError):
    """Training this round would push a site past its privacy cap."""

    exit_code = 6


class SitOut(PrivacyBudgetExceeded):  # a refusal the site planned, not an error of the run
    """A site's DP run plan trains every few rounds only (its cap fits no more), and this round is not one of them."""

    exit_code = 9


class PolicyRefusal(MedfedError):
    """A hospital's own policy (its site config) refuses what the coordinator asked: DP switched off, a stage it
    does not answer, a request over its limits."""

    exit_code = 7


class RunFailed(MedfedError):
    """A run ended without a single usable answer from any hospital, and not because they all refused."""

    exit_code = 8


class ServiceUnavailable(MedfedError):
    """A service medfed runs or reaches (the SuperLink, the coordinator) did not answer; the message says why."""

    exit_code = 10


EXIT_CODES: dict[int, str] = {
    0: "Success.",
    1: "Unexpected error; see the log above.",
    ConfigError.exit_code: (
        "Bad configuration: fix the named key (see `medfed config show` and README 'How config works')."
    ),
    DatasetUnavailableError.exit_code: (
        "Dataset file missing: place it where the message says, or go online with medfed[download]."
    ),
    SiteDataError.exit_code: "A site's data is unusable: run `medfed hospital check` on it.",
    IncompatibleUpdateError.exit_code: (
        "A model update does not match the global model: all sites must run the same model config."
    ),
    PrivacyBudgetExceeded.exit_code: "A site reached its privacy cap: it stopped training to stay within its budget.",
    SitOut.exit_code: "A site sat a round out, as the privacy plan it made for the run says (not an error).",
    RunFailed.exit_code: "No hospital answered: read the reasons above and the hospitals' logs.",
    ServiceUnavailable.exit_code: "A service did not answer: read the reason above and the log it names.",
    PolicyRefusal.exit_code: (
        "A hospital's policy refused the request: change the recipe to one its site config allows (see the reason)."
    ),
}
