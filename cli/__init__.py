"""Command-line interface (`qponder`)."""
