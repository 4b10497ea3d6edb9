"""Distillation methods behind one interface: LRC and the free-weight baselines, and their registry."""
