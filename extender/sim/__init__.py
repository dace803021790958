"""The simulator: replays workloads on fleets through the same pure core the live extender uses."""
