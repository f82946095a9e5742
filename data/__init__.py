"""Data: where images come from (sources) and how training views are made from them (augmentations)."""
