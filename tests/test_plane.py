import math

import pytest

from engine.plane import Axis, PreferencePlane, circle_anchors


def test_axes_weights_are_coordinate_times_scale_clipped():
    plane = PreferencePlane(Axis("help", scale=2.0), Axis("verb"))
    assert plane.weights(0.25, -0.5) == {"help": 0.5, "verb": -0.5}
    assert plane.weights(3.0, -7.0) == {"help": 2.0, "verb": -1.0}
    assert plane.weights(0, 0) == {"help": 0.0, "verb": 0.0}
    assert PreferencePlane(Axis("help"), Axis(None)).weights(0.3, 0.9) == {"help": 0.3}


def test_anchor_layout_for_more_than_two_directions():
    plane = PreferencePlane(anchors=circle_anchors(["a", "b", "c"]))
    assert plane.weights(0, 0) == {"a": 0.0, "b": 0.0, "c": 0.0}
    ax, ay = plane.anchors["b"]
    assert plane.weights(ax, ay) == {"a": 0.0, "b": 1.0, "c": 0.0}
    # Halfway round the circle between a and b: a and b equal, c smaller, the sum is the radius.
    (x1, y1), (x2, y2) = plane.anchors["a"], plane.anchors["b"]
    mx, my = (x1 + x2) / 2, (y1 + y2) / 2
    r = math.hypot(mx, my)
    w = plane.weights(mx / r, my / r)
    assert w["a"] == pytest.approx(w["b"]) and w["c"] < w["a"]
    assert sum(w.values()) == pytest.approx(1.0)
    half = plane.weights(mx / r / 2, my / r / 2)
    assert sum(half.values()) == pytest.approx(0.5)


def test_json_round_trip():
    plane = PreferencePlane(anchors=circle_anchors(["a", "b", "c", "d"]))
    assert PreferencePlane.from_json(plane.to_json()).weights(0.2, 0.3) == plane.weights(0.2, 0.3)
    two = PreferencePlane(Axis("x", 0.5, -2, 2), Axis("y"))
    assert PreferencePlane.from_json(two.to_json()) == two
