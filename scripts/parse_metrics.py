"""Parses a /metrics body (read from stdin) with prometheus_client's strict OpenMetrics parser
and prints every sample as JSON: [{"name", "labels", "value"}]. Exits non-zero on a body that
is not valid OpenMetrics. Used by the test suite (tests/api/binary.rs)."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
json.dump(samples, sys.stdout)
