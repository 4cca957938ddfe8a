"""The tests' access to the shared MedMNIST files: each test names the file it reads; a missing file skips the test
with its reason, and fails it in CI (MEDFED_REQUIRE_DATA=1) so nothing passes silently on less than the real data."""

from __future__ import annotations

import pytest

from tests.conftest import require_medmnist, shared_medmnist


def test_a_missing_file_skips_or_falls_back_outside_ci_and_fails_in_ci(tmp_path, monkeypatch):
    (tmp_path / "breastmnist.npz").write_bytes(b"")
    monkeypatch.setenv("MEDFED_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MEDFED_REQUIRE_DATA", raising=False)

    assert shared_medmnist("breastmnist") == tmp_path / "breastmnist.npz"
    assert require_medmnist("breastmnist") == tmp_path
    assert shared_medmnist("pneumoniamnist") is None  # the file the test reads, not any file of the folder
    with pytest.raises(pytest.skip.Exception, match="pneumoniamnist.npz not found"):
        require_medmnist("pneumoniamnist")

    monkeypatch.setenv("MEDFED_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="pneumoniamnist.npz is missing and MEDFED_REQUIRE_DATA=1"):
        shared_medmnist("pneumoniamnist")
    with pytest.raises(pytest.fail.Exception):
        require_medmnist("pneumoniamnist")
