"""SecAgg+ settings of a run (the protocol itself runs in tests/e2e/test_privacy.py)."""

from __future__ import annotations

import pytest

from medfed.common.config import compose_config
from medfed.common.errors import ConfigError
from medfed.server.secure_aggregation import secagg_parameters


def test_secure_aggregation_settings_default_to_every_hospital_and_two_thirds() -> None:
    assert secagg_parameters(compose_config(["federation.hospitals=3", "privacy.secure_aggregation=true"])) == (3, 2)
    assert secagg_parameters(compose_config(["federation.hospitals=5", "privacy.secure_aggregation=true"])) == (5, 4)
    explicit = compose_config(["federation.hospitals=5", "privacy.secagg_shares=4", "privacy.secagg_threshold=3"])
    assert secagg_parameters(explicit) == (4, 3)
    with pytest.raises(ConfigError, match="central_dp cannot be combined with privacy.secure_aggregation"):
        compose_config(["privacy=central_dp", "privacy.secure_aggregation=true"])
