"""What an item's passes keep, between them: each pass's object holds only what it made
(worker.merged reads them in order, a later value of a name in place of an earlier one), and the
driver (kept.KeptValues) hands on every object holding a name no later pass kept, freeing the rest."""

from __future__ import annotations

import numpy as np

from raymerge.execution.kept import KeptValues
from raymerge.execution.worker import merged


def test_a_later_objects_value_of_a_name_replaces_an_earlier_ones_per_piece():
    first = {(0, 0): {"mean": np.zeros(2), "at": "u1"}, (1, 0): {"mean": np.ones(2), "at": "u1"}}
    second = {(0, 0): {"tangent": np.full(2, 2.0), "tangent-of": 2}}
    third = {(0, 0): {"mean": np.full(2, 3.0), "at": "u2"}}
    got = merged((first, None, second, third), None)
    assert got[(0, 0)]["at"] == "u2" and got[(0, 0)]["mean"][0] == 3 and got[(0, 0)]["tangent-of"] == 2
    assert got[(1, 0)]["at"] == "u1"  # the other piece: the first object's
    # `live`: only the names the driver still hands on from each object
    got = merged((first, second), [["at"], ["tangent", "tangent-of"]])
    assert got[(0, 0)] == {"at": "u1", "tangent": second[(0, 0)]["tangent"], "tangent-of": 2}


def _kept() -> KeptValues:
    kept = KeptValues.__new__(KeptValues)  # no Ray here: the bookkeeping alone
    kept.on, kept._refs, kept._next = True, {}, {}
    return kept


def test_the_driver_frees_an_object_once_later_passes_kept_every_name_it_holds():
    kept = _kept()
    kept._next[7] = "mean-pass"
    kept.finished(7, ("at", "mean"))
    kept._next[7] = "dots-pass"
    kept.finished(7, ())  # kept nothing: its (empty) object is dropped, the mean stays
    kept._next[7] = "tangent-pass"
    kept.finished(7, ("tangent", "tangent-of"))
    assert kept._given(7) == (["mean-pass", "tangent-pass"],
                              {"live": [["at", "mean"], ["tangent", "tangent-of"]]})
    kept._next[7] = "unit-pass"
    kept.finished(7, ("at", "mean"))  # a new mean: the first object is freed, the tangent's stays
    assert kept._given(7)[0] == ["tangent-pass", "unit-pass"]
    kept._next[7] = "partial"
    kept.finished(7, ("tangent-of",))  # an object still holding one live name is handed on for it
    assert kept._given(7) == (["tangent-pass", "unit-pass", "partial"],
                              {"live": [["tangent"], ["at", "mean"], ["tangent-of"]]})
    kept.written(7)
    assert kept._given(7) == ([], {})
