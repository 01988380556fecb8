"""The simulated world: guests as driver/device pairs on a virtual clock, managed by the engine."""
