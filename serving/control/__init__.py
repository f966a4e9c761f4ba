"""Control: the planner, step accounting and measured efficiency, calibration, the
controller, the engine's monitor and its metrics. It observes the engine; the engine never
imports it."""
