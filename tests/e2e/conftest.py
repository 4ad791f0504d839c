"""Every test here runs whole commands on a real local Ray (and S3 on moto): the `e2e` tier,
which `pytest -m "not e2e"` leaves out (README: the fast tier)."""

from __future__ import annotations

import pathlib

import pytest

_HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
