"""A folded YOLO keeps working in ultralytics' own inference path.

``YOLO.predict`` calls the model's ``fuse()``, which folds the BN of every ``Conv`` that still
has a ``bn`` attribute by reading its tensors: after bnsurgery's fold that is the identity left
in the BN's place (:class:`bnsurgery.layers.FoldedBatchNorm`), which must fuse into nothing.
Runs where ultralytics is installed (the dev extra installs it, so CI runs it); the model is
built from the yaml the package ships, with random weights: nothing is downloaded.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import bnsurgery
from bnsurgery.testing import randomize_bn

pytest.importorskip("ultralytics")

pytestmark = pytest.mark.slow


@pytest.fixture
def settings_home(tmp_path, monkeypatch):
    """ultralytics writes a settings file on import: into the test's folder, not the user's."""
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("YOLO_OFFLINE", "1")


def test_a_folded_yolo_predicts_as_before(settings_home):
    from ultralytics import YOLO

    torch.manual_seed(0)
    original = YOLO("yolov8n.yaml")
    randomize_bn(original.model).eval()
    folded = copy.deepcopy(original)
    bnsurgery.fold(folded.model, torch.rand(1, 3, 64, 64))
    report = bnsurgery.last_report(folded.model)
    assert len(report.folded) == report.bn_count > 50, report.left
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    expected = original.predict(image, imgsz=64, conf=0.0, verbose=False)[0].boxes.data
    got = folded.predict(image, imgsz=64, conf=0.0, verbose=False)[0].boxes.data
    assert got.shape == expected.shape and len(got) > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = folded.model(x)[0]
        folded.model.fuse(verbose=False)  # what predict's backend runs, here on the model itself
        assert folded.model.is_fused()
        assert torch.equal(folded.model(x)[0], before)  # each leftover fused as an exact 1
