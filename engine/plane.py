"""The preference plane: a point (x, y) becomes combination weights.

Two layouts:

- **axes** (default): the x axis is bound to one direction and the y axis to another;
  weight = coordinate (clipped to the axis range) x the axis scale. The origin is the base model.
- **anchors**, for more than two directions: each direction sits at an anchor point (by default evenly
  on the unit circle). The weights are inverse-distance (Shepard, power 2) weights of the point to the
  anchors, normalised to sum to one, then multiplied by the point's distance from the origin (capped at
  1). So the origin is still the base model, a point on an anchor is that direction alone at weight 1,
  and a point between two anchors blends them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from engine.errors import TsdpoError


@dataclass
class Axis:
    direction: Optional[str] = None
    scale: float = 1.0
    low: float = -1.0
    high: float = 1.0

    def weight(self, coordinate: float) -> float:
        return min(max(coordinate, self.low), self.high) * self.scale


@dataclass
class PreferencePlane:
    x: Axis = field(default_factory=Axis)
    y: Axis = field(default_factory=Axis)
    anchors: dict[str, tuple[float, float]] = field(default_factory=dict)
    power: float = 2.0

    def weights(self, x: float, y: float) -> dict[str, float]:
        if not self.anchors:
            out: dict[str, float] = {}
            for axis, c in ((self.x, x), (self.y, y)):
                if axis.direction:
                    out[axis.direction] = out.get(axis.direction, 0.0) + axis.weight(c)
            return out
        gain = min(math.hypot(x, y), 1.0)
        dists = {k: math.hypot(x - ax, y - ay) for k, (ax, ay) in self.anchors.items()}
        hit = [k for k, d in dists.items() if d < 1e-9]
        if hit:
            return {k: (gain if k == hit[0] else 0.0) for k in self.anchors}
        raw = {k: d ** -self.power for k, d in dists.items()}
        total = sum(raw.values())
        return {k: gain * v / total for k, v in raw.items()}

    def to_json(self) -> dict:
        return {"x": vars(self.x), "y": vars(self.y), "anchors": {k: list(v) for k, v in self.anchors.items()},
                "power": self.power}

    @classmethod
    def from_json(cls, d: dict) -> "PreferencePlane":
        """A plane from a session file; refused (with the reason) when a number in it is not finite."""
        try:
            plane = cls(Axis(**d.get("x", {})), Axis(**d.get("y", {})),
                        {k: (float(v[0]), float(v[1])) for k, v in d.get("anchors", {}).items()}, float(d.get("power", 2.0)))
            numbers = [plane.x.scale, plane.x.low, plane.x.high, plane.y.scale, plane.y.low, plane.y.high, plane.power,
                       *(c for xy in plane.anchors.values() for c in xy)]
            if not all(math.isfinite(float(v)) for v in numbers):
                raise ValueError("it holds a number that is not finite")
        except (TypeError, ValueError, IndexError) as exc:
            raise TsdpoError(f"The saved plane layout is damaged ({exc}); reset the plane.") from exc
        return plane


def circle_anchors(names: list[str]) -> dict[str, tuple[float, float]]:
    n = len(names)
    return {name: (math.cos(math.pi / 2 - 2 * math.pi * i / n), math.sin(math.pi / 2 - 2 * math.pi * i / n))
            for i, name in enumerate(names)}
