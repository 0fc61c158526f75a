"""Low-rank algorithms as pure tensor functions: factors that approximate a weight or its error."""
