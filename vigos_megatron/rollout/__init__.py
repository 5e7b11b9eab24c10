"""Rollouts -> loss inputs: completion parsing (exact token spans) and micro-batch stream assembly."""
