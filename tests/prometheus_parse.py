"""Parses Prometheus text exposition on stdin with the Prometheus project's own parser
and prints every sample as JSON: [type, name, labels, value]. A malformed exposition
raises, which fails the calling test."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families

out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([family.type, s.name, s.labels, s.value])
print(json.dumps(out))
