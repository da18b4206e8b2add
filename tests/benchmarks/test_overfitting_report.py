"""benchmarks/overfitting_report.py: the trade-off plot's labels keep clear of each other and of the points."""

from __future__ import annotations

import itertools

import pytest


@pytest.fixture(scope="module")
def report(load_benchmark):
    return load_benchmark("overfitting_report")


def boxes(anchors, sizes, offsets):
    return [(x + dx, y + dy, x + dx + w, y + dy + h) for (x, y), (w, h), (dx, dy) in zip(anchors, sizes, offsets)]


def test_a_lone_label_sits_up_right_of_its_point(report):
    assert report.free_label_offsets([(100.0, 100.0)], [(40.0, 8.0)], pad=3.0) == [(3.0, 3.0)]


def test_labels_of_a_tight_cluster_cover_neither_each_other_nor_the_points(report):
    """Five points 2 pt apart (the 400-step panel's TI / LoRA pair, closer still): every label finds its own place."""
    anchors = [(200.0 + 3 * i, 200.0 - 2 * i) for i in range(5)]
    sizes = [(60.0, 8.0)] * 5
    placed = boxes(anchors, sizes, report.free_label_offsets(anchors, sizes, marker=3.0))
    for a, b in itertools.combinations(placed, 2):
        assert report._overlap_area(a, b) == 0.0
    for i, box in enumerate(placed):
        for j, (x, y) in enumerate(anchors):
            if j != i:
                assert report._overlap_area(box, (x - 3, y - 3, x + 3, y + 3)) == 0.0


def test_labels_stay_inside_the_bounds_where_there_is_room(report):
    """A point at the axes' right edge puts its label to its left, one at the top puts it below."""
    bounds = (0.0, 0.0, 300.0, 200.0)
    anchors, sizes = [(295.0, 100.0), (100.0, 197.0)], [(60.0, 8.0), (60.0, 8.0)]
    for box in boxes(anchors, sizes, report.free_label_offsets(anchors, sizes, bounds=bounds)):
        assert bounds[0] <= box[0] and bounds[1] <= box[1] and box[2] <= bounds[2] and box[3] <= bounds[3]


def test_overlap_area_counts_the_gap(report):
    assert report._overlap_area((0, 0, 2, 2), (1, 1, 3, 3)) == 1.0
    assert report._overlap_area((0, 0, 1, 1), (2, 0, 3, 1)) == 0.0
    assert report._overlap_area((0, 0, 1, 1), (1.5, 0, 3, 1), gap=1.0) == 0.5
