"""The claims stage, the DAG's last: each of the paper's seven claims as one statistic of the earlier stages'
outputs, judged reproduced / not reproduced / inconclusive by a rule fixed in code (lpo.claims.verdict), and
written as reports/<world>/claims.md and claims.csv."""
