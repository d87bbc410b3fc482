"""Chorus on one machine: the process supervisor behind `chorus up` and `chorus demo` (cluster.py), which
starts model workers and a coordinator. Neither service imports it; it needs both extras."""
