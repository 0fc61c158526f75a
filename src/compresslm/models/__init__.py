"""Loading models, discovering their layout, and tiny models for tests."""
