"""safetylock."""
