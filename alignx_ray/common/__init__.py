"""Shared basics: typed configs, the preference space, table schemas, prompts, seeding, Ray helpers."""
