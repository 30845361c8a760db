"""Where things are: the packaged locustfile (`locust -f $(python -m ampd_plugin.loadtest.where)`), and the
router's own count of KV bytes it moved (its Prometheus /metrics)."""

from ampd_plugin.loadtest import LOCUSTFILE

ROUTER_KV_METRIC = "ampd_router_kv_bytes_moved_total"


def router_kv_bytes(host: str) -> float | None:
    """`ampd_router_kv_bytes_moved_total` summed over plans at `host` (0 when our router moved nothing yet),
    or None when the server is not our router (a plain engine, vllm-router) or cannot be reached. The router counts per round the KV
    tokens its plan moves × its cost model's bytes per token: an estimate, not the connectors' own count."""
    from ampd_plugin.localcluster import metric_sum, scrape_metrics

    try:
        metrics = scrape_metrics(host.rstrip("/"), prefix="ampd_router_")
    except (OSError, ValueError):
        return None
    if not metrics:  # not our router (a plain engine, vllm-router): it reports nothing about KV
        return None
    return metric_sum(metrics, ROUTER_KV_METRIC)

if __name__ == "__main__":
    print(LOCUSTFILE)
