"""Assemble a Router from a RouterConfig: the cost model, the policy (via the registry), the server."""

from __future__ import annotations

from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router.costs import router_cost_model
from ampd_plugin.router_policy.registry import load_policy
from ampd_plugin.router.server import Router


def make_router(cfg: RouterConfig) -> Router:
    cost_model = router_cost_model(cfg.profile, cfg.cost_model, cfg.gpu)
    params = {"ttft_slo": cfg.ttft_slo, "itl_slo": cfg.itl_slo, **cfg.policy_params}
    policy = load_policy(cfg.policy, cost_model, **params)
    return Router(cfg, policy, cost_model)
