"""Test doubles and service helpers shared by the tests and the benches (no pytest needed)."""
