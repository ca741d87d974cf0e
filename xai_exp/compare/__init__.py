"""Comparing runs: the table of settings with intervals and paired tests, method agreement
across a sweep, and the HTML report.

May import: every core wing, `track`, MLflow.
"""
