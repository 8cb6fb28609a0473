"""Workloads built on mlplatform; each package exposes ``Config`` and ``run``."""
