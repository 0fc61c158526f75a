"""Runtime modules that compute with compressed weights."""
