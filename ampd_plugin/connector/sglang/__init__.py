"""The `ampd` transfer backend for SGLang prefill/decode disaggregation (pinned: SGLang 0.5.23).

SGLang loads `register.register` through the `sglang.srt.plugins` entry point in every process. Nothing
here is imported by `import ampd_plugin`; every module of this package but `wire` imports SGLang, so import them
only inside an SGLang environment (`scripts/setup_sglang_venv.sh`).

- `register`: makes `--disaggregation-transfer-backend ampd` valid and points SGLang's backend lookup here.
- `backend`: manager/sender/receiver/bootstrap server on SGLang's common classes + our Mooncake wrapper.
- `messages`: what the decode side tells the prefill side (registration, per-request destinations).
- `local_prefill`: scheduler hooks that let a decode worker run an incremental prefill itself.
- `wire`: the bootstrap fields and local-prefill sentinel (no SGLang import; the router builds bodies from it).
- `checks`: start-up validation of the server arguments those hooks support.
"""

SUPPORTED_SGLANG_VERSION = "0.5.23"
BACKEND_NAME = "ampd"
