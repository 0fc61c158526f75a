"""The sequential calibration engine and its statistics."""
