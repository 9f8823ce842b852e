"""Upload checks: every malformed upload kind is rejected with the client named."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from metamoe.protocol import UploadError, check_arrays, check_metrics, from_record, get_record, record_nbytes, to_record

SPEC = {"w": (2, 3), "b": (3,)}


def good():
    return {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def test_good_upload_roundtrips_through_a_record():
    arrays = from_record(to_record(good()))
    assert check_arrays(arrays, SPEC, "c1", "expert").keys() == SPEC.keys()
    assert record_nbytes(RecordDict({"a": to_record(good())})) > 6 * 4


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.pop("b"), "missing"),
    (lambda a: a.update(extra=np.ones(1, np.float32)), "unexpected"),
    (lambda a: a.update(w=np.ones((3, 2), np.float32)), "shape"),
    (lambda a: a.update(w=np.ones((2, 3), np.float64)), "dtype"),
    (lambda a: a.update(b=np.array([0, np.nan, 0], np.float32)), "NaN or Inf"),
    (lambda a: a.update(b=np.array([0, np.inf, 0], np.float32)), "NaN or Inf"),
])
def test_malformed_uploads_are_rejected_naming_the_client(mutate, match):
    arrays = good()
    mutate(arrays)
    with pytest.raises(UploadError, match=f"client c7.*{match}"):
        check_arrays(arrays, SPEC, "c7", "expert")


def test_missing_or_wrong_kind_of_record():
    content = RecordDict({"expert": ConfigRecord({"x": 1})})
    with pytest.raises(UploadError, match="expected ArrayRecord"):
        get_record(content, "expert", ArrayRecord, "c2")
    with pytest.raises(UploadError, match="no ArrayRecord 'router'"):
        get_record(content, "router", ArrayRecord, "c2")


def test_metrics_must_be_finite_and_complete():
    with pytest.raises(UploadError, match="missing 'acc'"):
        check_metrics(MetricRecord({"n": 1}), ["acc"], "c3")
    with pytest.raises(UploadError, match="not finite"):
        check_metrics(MetricRecord({"acc": float("nan")}), ["acc"], "c3")
