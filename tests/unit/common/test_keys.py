"""Wire keys: the refusal marker the coordinator reads back from a hospital's forwarded error."""

from __future__ import annotations

import pytest

from medfed.common import keys
from medfed.common.errors import PrivacyBudgetExceeded


def test_each_refusal_is_named_after_its_error_type():
    assert keys.SiteRefusal.PRIVACY_BUDGET.value == PrivacyBudgetExceeded.__name__


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("PrivacyBudgetExceeded: Privacy cap reached: ...", keys.SiteRefusal.PRIVACY_BUDGET),
        # as Flower forwards a ClientApp's exception
        ("<class 'medfed.client.app.SiteFailure'>:<'PrivacyBudgetExceeded: Privacy cap reached'>",
         keys.SiteRefusal.PRIVACY_BUDGET),
        # as Flower's simulation runtime forwards it (its actor wraps the exception in a ClientAppException)
        ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
         "Message: PrivacyBudgetExceeded: Privacy cap reached'>", keys.SiteRefusal.PRIVACY_BUDGET),
        ("<class 'medfed.client.app.SiteFailure'>:<'ConfigError: bad value'>", None),
        # the word alone, inside another failure's text, is no refusal
        ("ValueError while handling train; the PrivacyBudgetExceeded file was missing", None),
        ("", None),
    ],
)
def test_site_refusal_reads_the_error_type_that_opens_the_text(reason, expected):
    assert keys.site_refusal(reason) is expected
