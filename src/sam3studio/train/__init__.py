"""Training: synthetic shapes data, the DETR-style set criterion, and the mixed-precision loop."""
