"""On-disk formats: bit packing and the .clm container."""
