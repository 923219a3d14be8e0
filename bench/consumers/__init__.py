"""Comparison consumers, each run by the harness as its own process.

Every one takes the same arguments (see `common.parse_args`), calls `bench.handlers.record`
per message, and stops on SIGTERM.
"""
