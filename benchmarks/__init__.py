"""Benchmarks of the appliance, one module each, run with ``scripts/bench NAME``.

Each module is runnable (``python -m benchmarks.NAME``), takes ``--help``, and prints its
figures next to a baseline measured in the same run on the same machine, with their
ratio: absolute numbers depend on the machine (a Pi 4's SD card and a laptop's SSD differ
by orders of magnitude on fsync), ratios travel. Nothing here is imported by the appliance.
"""
