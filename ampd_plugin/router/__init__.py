"""The live HTTP router: an OpenAI-compatible front door driving a routing policy against real engines.

`ampd-plugin route` (`cli`) builds a `server.Router` (`app.make_router`) from a `config.RouterConfig`.
The policy itself lives in `ampd_plugin.router_policy` (pure, shared with the simulator); everything
here does the I/O around it. See `server` for how the pieces fit.
"""
