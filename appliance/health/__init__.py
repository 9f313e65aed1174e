"""Health: the checks that say, in plain words, what is wrong and how to fix it."""

from appliance.health.registry import CheckFn, HealthRegistry

__all__ = ["CheckFn", "HealthRegistry"]
