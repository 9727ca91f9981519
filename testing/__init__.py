"""Helpers for the tests, benchmarks and demo (not part of the installed package): a `lutstore serve`
child process (daemon.Daemon)."""
