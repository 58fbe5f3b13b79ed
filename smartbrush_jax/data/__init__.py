"""Input side of training: readers, preparation into ArrayRecord, the synthetic shapes
set, and the Grain pipeline."""
