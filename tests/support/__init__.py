"""Shared code for the tests: peers, servers, data builders and wait helpers."""
