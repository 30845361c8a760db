"""`ampd-plugin` command line.

Each sub-command lives next to the code it drives (planner, router, load test, ...) and is imported
only when invoked, so `ampd-plugin simulate` never pays for importing the router or an engine.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:click_command". Owners add their command here and nowhere else.
COMMANDS: dict[str, str] = {
    "workload": "ampd_plugin.workload_cli:workload",
    "simulate": "ampd_plugin.planner.simulate_cli:simulate",
    "plan": "ampd_plugin.planner.plan_cli:plan",
    "profile": "ampd_plugin.planner.profile:profile",
    "route": "ampd_plugin.router.cli:route",
    "loadtest": "ampd_plugin.loadtest_cli:loadtest",
    "demo": "ampd_plugin.demo:demo",
    "build-tiny-model": "ampd_plugin.tiny_model:build_tiny_model_cmd",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("ampd_plugin"):
                return None  # not part of this build
            raise click.ClickException(
                f"'{name}' needs the optional dependency '{exc.name}'; install it, e.g. pip install 'ampd-plugin[test]'"
            )
        return getattr(module, attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="ampd-plugin")
def main() -> None:
    """AMPD multi-round prefill/decode serving: route, plan, simulate, load-test."""


if __name__ == "__main__":
    main()
