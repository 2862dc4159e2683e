"""Builds deploy/grafana/tokenmill.json: python deploy/grafana/build_dashboard.py (the JSON is committed).

Panels query tokenmill_* (server) and tokenmill_gateway_* (gateway); tests/test_grafana.py checks that every
metric queried exists in a live /metrics.
"""
import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
panels = []
y = 0


def row(title):
    global y
    panels.append({"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                   "id": len(panels) + 1, "panels": []})
    y += 1


def ts(title, targets, unit="short", x=0, w=8, h=8, desc=""):
    panels.append({
        "type": "timeseries", "title": title, "description": desc, "datasource": DS, "id": len(panels) + 1,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 2, "fillOpacity": 10}}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
                    for i, (e, l) in enumerate(targets)],
    })


def quantiles(metric, sel, by=""):
    grp = f"le{', ' + by if by else ''}"
    lf = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({grp}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))",
             f"{lf}p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]


M = 'model_name=~"$model_name"'
P = 'pool=~"$pool"'
row("Server (tokenmill serve)")
ts("Token throughput", [(f"sum(rate(tokenmill_generation_tokens_total{{{M}}}[$__rate_interval]))", "generation tok/s"),
                         (f"sum(rate(tokenmill_prompt_tokens_total{{{M}}}[$__rate_interval]))", "prompt tok/s")],
   "short", 0)
ts("Requests finished by reason", [(f"sum by (finished_reason) (rate(tokenmill_request_success_total{{{M}}}[$__rate_interval]))",
                                    "{{finished_reason}}")], "reqps", 8)
ts("Requests running / waiting", [(f"sum(tokenmill_num_requests_running{{{M}}})", "running"),
                                  (f"sum(tokenmill_num_requests_waiting{{{M}}})", "waiting")], "short", 16)
y += 8
ts("Time to first token", quantiles("tokenmill_time_to_first_token_seconds", M), "s", 0)
ts("Inter-token latency", quantiles("tokenmill_inter_token_latency_seconds", M), "s", 8)
ts("End-to-end request latency", quantiles("tokenmill_e2e_request_latency_seconds", M), "s", 16)
y += 8
ts("Queue / prefill / decode time (p90)",
   [(f"histogram_quantile(0.9, sum by (le) (rate(tokenmill_request_queue_time_seconds_bucket{{{M}}}[$__rate_interval])))", "queue"),
    (f"histogram_quantile(0.9, sum by (le) (rate(tokenmill_request_prefill_time_seconds_bucket{{{M}}}[$__rate_interval])))", "prefill"),
    (f"histogram_quantile(0.9, sum by (le) (rate(tokenmill_request_decode_time_seconds_bucket{{{M}}}[$__rate_interval])))", "decode")],
   "s", 0)
ts("KV cache usage", [(f"max(tokenmill_kv_cache_usage_perc{{{M}}})", "KV used")], "percentunit", 8)
ts("Prefix cache hit rate and preemptions",
   [(f"sum(rate(tokenmill_prefix_cache_hits_total{{{M}}}[$__rate_interval])) / sum(rate(tokenmill_prefix_cache_queries_total{{{M}}}[$__rate_interval]))", "hit rate"),
    (f"sum(rate(tokenmill_num_preemptions_total{{{M}}}[$__rate_interval]))", "preemptions/s")], "percentunit", 16)
y += 8
ts("Constrained requests by kind",
   [(f"sum by (kind) (rate(tokenmill_constrained_requests_total{{{M}}}[$__rate_interval]))", "{{kind}}")], "reqps", 0,
   desc="Requests decoding under a JSON schema, regex, choice, grammar, JSON object or forced tool calls.")
ts("Grammar compile time", quantiles("tokenmill_grammar_compile_seconds", M), "s", 8,
   desc="Compiles in the engine core's thread pool; a grammar-cache hit counts with its near-zero time.")
ts("Grammar compiles waiting / failing",
   [(f"sum(tokenmill_num_requests_waiting_for_grammar{{{M}}})", "waiting for grammar"),
    (f"sum(rate(tokenmill_grammar_compile_failures_total{{{M}}}[$__rate_interval]))", "failures/s")], "short", 16)
y += 8
row("Gateway (tokenmill gateway)")
ts("Requests by pool and status", [(f"sum by (pool, status) (rate(tokenmill_gateway_requests_total{{{P}}}[$__rate_interval]))",
                                    "{{pool}} {{status}}")], "reqps", 0)
ts("Admission queue depth", [(f"sum by (pool) (tokenmill_gateway_queue_depth{{{P}}})", "{{pool}}")], "short", 8)
ts("Replicas desired / ready", [(f"sum by (pool) (tokenmill_gateway_replicas_desired{{{P}}})", "{{pool}} desired"),
                                (f"sum by (pool) (tokenmill_gateway_replicas_ready{{{P}}})", "{{pool}} ready")], "short", 16)
y += 8
ts("Gateway TTFT", quantiles("tokenmill_gateway_ttft_seconds", P, "pool"), "s", 0)
ts("Upstream latency", quantiles("tokenmill_gateway_upstream_latency_seconds", P, "pool"), "s", 8)
ts("Queue time", quantiles("tokenmill_gateway_queue_time_seconds", P, "pool"), "s", 16)
y += 8
ts("Output tokens through the gateway", [(f"sum by (pool) (rate(tokenmill_gateway_output_tokens_total{{{P}}}[$__rate_interval]))",
                                          "{{pool}}")], "short", 0)
ts("Retries and ejections", [(f"sum by (pool) (rate(tokenmill_gateway_retries_total{{{P}}}[$__rate_interval]))", "{{pool}} retries/s"),
                             (f"sum by (pool) (increase(tokenmill_gateway_ejections_total{{{P}}}[$__rate_interval]))", "{{pool}} ejections")],
   "short", 8)
ts("Model routing split", [("sum by (alias, pool) (rate(tokenmill_gateway_routing_decisions_total[$__rate_interval]))",
                            "{{alias}} -> {{pool}}")], "reqps", 16)
y += 8
# Per replica (label `replica`: its URL). Errors are 5xx and cut streams; the client's 4xx have their own panel.
R = 'pool=~"$pool",replica=~"$replica"'
ts("Requests by replica", [(f"sum by (replica) (rate(tokenmill_gateway_requests_total{{{R}}}[$__rate_interval]))",
                            "{{replica}}")], "reqps", 0)
ts("Gateway errors (5xx, cut streams) by replica",
   [(f'sum by (replica, status) (rate(tokenmill_gateway_requests_total{{{R},status=~"5..|stream_error"}}[$__rate_interval]))',
     "{{replica}} {{status}}")], "reqps", 8)
ts("Client errors (4xx) by pool and status",
   [('sum by (pool, status) (rate(tokenmill_gateway_requests_total{status=~"4.."}[$__rate_interval]))',
     "{{pool}} {{status}}")], "reqps", 16,
   desc="Bad requests, unknown models, auth and rate limits: the client's doing, not a gateway failure.")
y += 8
ts("In flight per replica", [(f"sum by (replica) (tokenmill_gateway_replica_in_flight{{{R}}})", "{{replica}}")],
   "short", 0)
ts("KV cache usage per replica (scraped)",
   [(f"max by (replica) (tokenmill_gateway_replica_kv_cache_usage_perc{{{R}}})", "{{replica}}")], "percentunit", 8)
ts("Upstream latency p90 by replica",
   [(f"histogram_quantile(0.9, sum by (le, replica) (rate(tokenmill_gateway_upstream_latency_seconds_bucket{{{R}}}[$__rate_interval])))",
     "{{replica}}")], "s", 16)

dashboard = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus"}],
    "title": "tokenmill", "uid": "tokenmill", "editable": True, "schemaVersion": 39, "version": 1,
    "tags": ["tokenmill", "llm"], "time": {"from": "now-30m", "to": "now"}, "refresh": "10s",
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
        {"name": "model_name", "type": "query", "datasource": DS, "label": "Model", "includeAll": True,
         "multi": True, "current": {"text": "All", "value": "$__all"}, "allValue": ".*",
         "query": {"query": "label_values(tokenmill_num_requests_running, model_name)", "refId": "m"}, "refresh": 2},
        {"name": "pool", "type": "query", "datasource": DS, "label": "Pool", "includeAll": True, "multi": True,
         "current": {"text": "All", "value": "$__all"}, "allValue": ".*",
         "query": {"query": "label_values(tokenmill_gateway_replicas_ready, pool)", "refId": "p"}, "refresh": 2},
        {"name": "replica", "type": "query", "datasource": DS, "label": "Replica", "includeAll": True, "multi": True,
         "current": {"text": "All", "value": "$__all"}, "allValue": ".*",
         "query": {"query": "label_values(tokenmill_gateway_replica_ready, replica)", "refId": "r"}, "refresh": 2},
    ]},
    "panels": panels,
}
with open(Path(__file__).with_name("tokenmill.json"), "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
