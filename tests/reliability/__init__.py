"""Helpers of the reliability suite (tests/test_reliability_*.py): the bad-input corpus, a
fault-injecting proxy, and kill -9 trial drivers. See docs/reliability.md."""
