"""Wire keys: the refusal marker the coordinator reads back from a hospital's forwarded error."""

from __future__ import annotations

import pytest

from medfed.common import keys
from medfed.common import errors
from medfed.common.errors import PolicyRefusal, PrivacyBudgetExceeded


def test_each_refusal_is_named_after_its_error_type():
    assert keys.SiteRefusal.PRIVACY_BUDGET.value == PrivacyBudgetExceeded.__name__
    assert keys.SiteRefusal.POLICY.value == PolicyRefusal.__name__
    assert all(issubclass(getattr(errors, member.value), errors.MedfedError) for member in keys.SiteRefusal)


def test_every_exit_code_has_a_help_text():
    codes = {cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.MedfedError)}
    assert codes <= set(errors.EXIT_CODES)
    assert len(codes) == len([c for c in vars(errors).values()
                              if isinstance(c, type) and issubclass(c, errors.MedfedError)])


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
