"""Test suite of hpattn_dist (a package so spawned ranks can import test modules by name)."""
