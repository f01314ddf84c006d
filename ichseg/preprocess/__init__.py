"""Pure preprocessing: windowing, channel stacking, 2.5D, blank-slice detection, masking."""
