"""`ampd-plugin route`: start the router in front of running prefill and decode engines."""

from __future__ import annotations

import logging
import sys

import click

from ampd_plugin.router.config import RouterConfig


def _policy_params(values: tuple[str, ...]) -> dict:
    import yaml

    out = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint="--param")
        name, value = item.split("=", 1)
        out[name.strip()] = yaml.safe_load(value)  # 0.9 -> float, true -> bool, 3 -> int
    return out


class _GreedyOption(click.Option):
    """`--prefill URL URL ...`: also take the following non-option words (click has no nargs=-1 options)."""

    def add_to_parser(self, parser, ctx):  # type: ignore[override]
        result = super().add_to_parser(parser, ctx)
        for name in self.opts:
            opt = parser._long_opt.get(name) or parser._short_opt.get(name)
            if opt is None:
                continue
            original = opt.process

            def process(value, state, _original=original):
                words = [value]
                while state.rargs and not state.rargs[0].startswith("-"):
                    words.append(state.rargs.pop(0))
                _original(" ".join(words), state)

            opt.process = process
        return result


@click.command("route")
@click.option("--prefill", "prefill", multiple=True, cls=_GreedyOption, help="Prefill worker base URL (repeatable; also space-separated).")
@click.option("--decode", "decode", multiple=True, cls=_GreedyOption, help="Decode worker base URL (repeatable; also space-separated).")
@click.option("--engine", type=click.Choice(["vllm", "sglang"]), default=None,
              help="What the workers are: vllm (default; kv_transfer_params wire) or sglang (bootstrap_host/port/room wire).")
@click.option("--bootstrap-port", "bootstrap_ports", multiple=True, cls=_GreedyOption, metavar="PORT",
              help="SGLang: prefill workers' --disaggregation-bootstrap-port, one per --prefill in order, or one for all (default 8998).")
@click.option("--policy", default=None, help="ampd | disagg | colocated | threshold | an installed plugin name.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Policy parameter, e.g. alpha=0.9 beta=0.85 w=3.")
@click.option("--kv-connector", type=click.Choice(["ampd", "none"]), default=None, help="KV transfer protocol of the engines.")
@click.option("--ttft-slo", type=float, default=None, help="TTFT SLO in seconds.")
@click.option("--itl-slo", type=float, default=None, help="ITL SLO in seconds.")
@click.option("--host", default=None, help="Bind address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8000).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML file of router settings.")
@click.option("--api-key", envvar="AMPD_ROUTER_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY'. Prefer env AMPD_ROUTER_API_KEY or --api-key-file: "
                   "a key on the command line is visible to every local user in /proc (deprecated).")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File holding the API key (first line); keeps the key out of argv and the environment.")
@click.option("--tokenizer", "--model-dir", "tokenizer", default=None, help="Tokenizer dir/name (default: the engine's model dir when local).")
@click.option("--model", default=None, help="Served model name (default: what the engines report).")
@click.option("--profile", default=None, help="Fitted cost-model YAML from `ampd-plugin profile`.")
@click.option("--cost-model", default=None, help="Roofline cost model: model preset or config.json (with --gpu).")
@click.option("--gpu", default=None, help="GPU preset for the roofline cost model.")
@click.option("--balanced-pd-share", type=float, default=None, help="Strategy: P prefills this share of each remote prompt, D the rest.")
@click.option("--refit-online/--no-refit-online", default=None,
              help="Refit the --profile cost model's constants to live TTFT/TPOT (bounded, logged; off by default).")
@click.option("--refit-out", default=None, type=click.Path(dir_okay=False),
              help="Write the online-refitted profile YAML here after every refit (enables --refit-online).")
@click.option("--state", default=None, metavar="redis://HOST:PORT/DB",
              help="Share sessions, KV residency and worker measurements with other router replicas through this "
                   "Redis (password: env AMPD_REDIS_PASSWORD or AMPD_REDIS_PASSWORD_FILE). Default: this process only.")
@click.option("--replica-id", default=None, help="This replica's name in the shared state (default: host-pid-random).")
@click.option("--failover-limit", type=click.IntRange(min=0), default=None,
              help="A stream whose decode worker dies or stalls mid-round continues on another decode worker at "
                   "most this often per request [default: 1; 0: the client gets an SSE error event].")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def route(ctx, prefill, decode, engine, bootstrap_ports, policy, params, kv_connector, ttft_slo, itl_slo, host, port, config_file,
          api_key, api_key_file, tokenizer, model, profile, cost_model, gpu, balanced_pd_share, refit_online, refit_out,
          state, replica_id, failover_limit, log_level) -> None:
    """Run the multi-round-aware OpenAI-compatible router (binds 127.0.0.1 unless told otherwise)."""
    key_on_argv = api_key is not None and ctx.get_parameter_source("api_key") == click.core.ParameterSource.COMMANDLINE
    if api_key_file:
        if api_key is not None:
            raise click.UsageError("give the API key once: --api-key-file, or env AMPD_ROUTER_API_KEY / --api-key")
        api_key = _read_key(api_key_file)
    cfg = RouterConfig.from_yaml(config_file) if config_file else RouterConfig()
    split = lambda urls: [u for item in urls for u in item.split()]  # noqa: E731
    try:
        ports = [_port(p) for p in split(bootstrap_ports)]
        cfg = cfg.updated({
            "engine": engine, "bootstrap_ports": ports or None,
            "prefill": split(prefill) or None, "decode": split(decode) or None, "policy": policy,
            "policy_params": _policy_params(params) or None, "kv_connector": kv_connector, "ttft_slo": ttft_slo,
            "itl_slo": itl_slo, "host": host, "port": port, "api_key": api_key, "tokenizer": tokenizer,
            "model": model, "profile": profile, "cost_model": cost_model, "gpu": gpu,
            "balanced_pd_share": balanced_pd_share, "refit_online": refit_online, "refit_out": refit_out,
            "state": state, "replica_id": replica_id, "failover_limit": failover_limit, "log_level": log_level,
        })
        cfg.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc))
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if key_on_argv:
        logging.getLogger("ampd.router").warning(
            "--api-key on the command line is deprecated: every local user can read it in /proc/%d/cmdline; "
            "use env AMPD_ROUTER_API_KEY or --api-key-file", __import__("os").getpid())
    from ampd_plugin.router.app import make_router

    try:
        router = make_router(cfg)
    except ValueError as exc:
        raise click.UsageError(str(exc))
    import uvicorn

    loop = "uvloop" if _has("uvloop") else "asyncio"
    logging.getLogger("ampd.router").info("config: %s", cfg.redacted())
    # The guarded httptools protocol bounds every client's head, body and read time (router/limits.py).
    uvicorn.run(router.app, host=cfg.host, port=cfg.port, loop=loop, http=router.http_protocol(), access_log=False,
                log_level=cfg.log_level, timeout_graceful_shutdown=5)


def _read_key(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        key = f.readline().strip()
    if not key:
        raise click.UsageError(f"--api-key-file {path}: the file's first line is empty")
    return key


def _port(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--bootstrap-port {text!r}: expected a port number") from None


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
