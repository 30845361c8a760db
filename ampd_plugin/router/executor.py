"""How a round's plan becomes engine requests: the `RoundExecutor` protocol, chosen once per router.

An executor gets a `RoundCtx` whose plan (`primitives`) is decided and whose queue slot is held, and
returns the client's response. It is written only in `RoundIO`'s primitives, so a round reads top to
bottom as the sub-requests it sends. vLLM workers get `VLLMExecutor` (per-step `kv_transfer_params`);
disaggregated SGLang workers get `SGLangExecutor` (bootstrap fields, concurrent P and D requests).
"""

from __future__ import annotations

from typing import Callable, Protocol

from starlette.responses import Response

from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.round_io import RoundIO


class RoundExecutor(Protocol):
    async def execute(self, ctx: RoundCtx) -> Response:
        """Run `ctx.plan` and return the client's response (streamed or whole)."""
        ...


def make_executor(cfg: RouterConfig, io: RoundIO, model: Callable[[], str | None]) -> RoundExecutor:
    """SGLang's PD wire only when its workers are disaggregated SGLang; everything else is the vLLM wire."""
    if cfg.engine == "sglang" and cfg.kv_connector == "ampd":
        from ampd_plugin.router.sglang_exec import SGLangExecutor

        return SGLangExecutor(io, cfg.prefill_bootstrap_ports())
    from ampd_plugin.router.vllm_exec import VLLMExecutor

    return VLLMExecutor(io, kv_connector=cfg.kv_connector, model=model)
