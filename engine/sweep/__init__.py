"""Sweeping the preference plane: the numbers behind the paper's claims, on the user's own model and data.

For each method (tangent directions, steering vectors: a grid of plane points; scalarized-DPO runs: one
point each) and each point, per objective:

- held-out implicit-reward accuracy and mean margin against the base model,
  margin = beta * [(log pi(y_w) - log pi0(y_w)) - (log pi(y_l) - log pi0(y_l))] (no generation needed);
- on a prompt set: mean reply length in tokens, distinct-2, and a reward model's mean score when given;
- for tangent directions, the linearization gap: mean |log pi_lin - log pi| per response token, where the
  linearized model is f(theta0) + J (sum alpha tau) and the ordinary one f(theta0 + sum alpha tau);
- the weight-disentanglement error: how far the mix's per-token log-probs on each objective's data are
  from those of that objective's direction alone (the same point projected on its own axis).

Then per method: the Pareto front of (objective x, objective y) and its hypervolume against one reference
point shared by all methods, the smoothness of control along each axis, and canonical correlations
between the representation changes the two directions cause. Every point is saved as it is measured, so
a stopped sweep resumes where it stopped.

``runner`` (the resumable sweep), ``metrics`` (the measures as plain functions), ``report`` (sweep.json, plots,
report.md) and ``predict`` (the first-order map from one JVP per direction); the studio draws the results as
heatmap layers (``studio.heatmaps``).
"""

from engine.sweep.metrics import canonical_correlations, distinct_n, hypervolume, monotonicity, pareto_front
from engine.sweep.predict import gap_map_key, heldout_pairs_of, linearization_gap_map, margin_gradients, plane_gap_map, predicted_maps
from engine.sweep.report import report, write_outputs
from engine.sweep.runner import METRICS, Method, Sweep, SweepConfig, SweepError

__all__ = ["METRICS", "Method", "Sweep", "SweepConfig", "SweepError", "canonical_correlations", "distinct_n",
           "gap_map_key", "heldout_pairs_of", "hypervolume", "linearization_gap_map", "plane_gap_map", "margin_gradients", "monotonicity", "pareto_front", "predicted_maps",
           "report", "write_outputs"]
