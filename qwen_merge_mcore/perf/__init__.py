"""Scale planner and performance model: FLOPs, memory, layouts and step time on GPU clusters."""
