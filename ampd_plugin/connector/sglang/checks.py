"""Start-up checks for `--disaggregation-transfer-backend ampd`: refuse what the backend or the local
prefill hooks do not support, with a message that says what to change.

Runs as an AFTER hook on `ServerArgs.resolve_once` (the launcher resolves the arguments before it starts
any subprocess, so a bad combination stops the server before it loads a model). Servers that use another
backend are never affected.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping

from ampd_plugin.connector.sglang import BACKEND_NAME

LOCAL_PREFILL_ENV = "AMPD_SGLANG_LOCAL_PREFILL"
MULTI_TOKENIZER_PATCH = "patches/sglang-0.5.23/0001-load-plugins-in-multi-tokenizer-workers.patch"


class UnsupportedConfiguration(ValueError):
    """The server arguments combine the ampd backend with something it does not support."""


def local_prefill_enabled() -> bool:
    """Decode workers accept local (router-chosen) prefills unless AMPD_SGLANG_LOCAL_PREFILL=0."""
    return os.environ.get(LOCAL_PREFILL_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def multi_tokenizer_loads_plugins() -> bool:
    """True when SGLang's multi-tokenizer HTTP workers call load_plugins() (0.5.23 needs our patch)."""
    from sglang.srt.entrypoints import http_server

    return "load_plugins" in inspect.getsource(http_server.init_multi_tokenizer)


def problems(cfg: Mapping[str, Any], *, local_prefill: bool, multi_tokenizer_ok: bool) -> list[str]:
    """Everything wrong with resolved server arguments `cfg` for the ampd backend (empty = fine)."""
    if cfg.get("disaggregation_transfer_backend") != BACKEND_NAME:
        return []
    found = []
    mode = cfg.get("disaggregation_mode")
    if (cfg.get("pp_size") or 1) > 1:
        found.append("pipeline parallelism (--pp-size > 1) is not supported by the ampd backend")
    if cfg.get("disaggregation_decode_allocation_policy", "early") != "early":
        found.append("--disaggregation-decode-allocation-policy must be 'early' with the ampd backend")
    if cfg.get("enable_hisparse"):
        found.append("--enable-hisparse is not supported by the ampd backend")
    if (cfg.get("tokenizer_worker_num") or 1) > 1 and not multi_tokenizer_ok:
        found.append(
            "--tokenizer-worker-num > 1: SGLang 0.5.23's extra tokenizer workers never load plugins, so they "
            f"cannot parse the 'ampd' backend; apply {MULTI_TOKENIZER_PATCH} (python patches/apply.py) or "
            "use one tokenizer worker"
        )
    if mode == "decode" and local_prefill:
        need = "local prefill on a decode worker (set AMPD_SGLANG_LOCAL_PREFILL=0 to turn it off)"
        if not cfg.get("disaggregation_decode_enable_radix_cache"):
            found.append(
                f"{need} needs --disaggregation-decode-enable-radix-cache: without the decode radix cache "
                "a local prefill recomputes the whole history and no later round can reuse it"
            )
        if not cfg.get("disable_overlap_schedule"):
            found.append(
                f"{need} supports the normal scheduler loop only: add --disable-overlap-schedule"
            )
        if (cfg.get("attn_dp_size") or 1) > 1 or cfg.get("enable_dp_attention"):
            found.append(f"{need} does not support data-parallel attention (--enable-dp-attention)")
        if cfg.get("speculative_algorithm"):
            found.append(f"{need} does not support speculative decoding (--speculative-algorithm)")
        if cfg.get("enable_mixed_chunk"):
            found.append(f"{need} does not support --enable-mixed-chunk")
        if cfg.get("enable_hierarchical_cache"):
            found.append(f"{need} does not support --enable-hierarchical-cache")
    return found


def check(cfg: Mapping[str, Any]) -> None:
    """Raise `UnsupportedConfiguration` listing every problem of resolved arguments `cfg`."""
    if cfg.get("disaggregation_transfer_backend") != BACKEND_NAME:
        return
    multi_ok = (cfg.get("tokenizer_worker_num") or 1) <= 1 or multi_tokenizer_loads_plugins()
    found = problems(cfg, local_prefill=local_prefill_enabled(), multi_tokenizer_ok=multi_ok)
    if found:
        raise UnsupportedConfiguration(
            "--disaggregation-transfer-backend ampd: unsupported configuration:\n  - " + "\n  - ".join(found)
        )


def check_after_resolution(result, server_args, *args, **kwargs):
    """AFTER hook on `ServerArgs.resolve_once`."""
    check(server_args.resolved_dict())
    return result
