"""What a run will cost before anything is loaded: memory by part, FLOPs, whether it fits, and the report."""
