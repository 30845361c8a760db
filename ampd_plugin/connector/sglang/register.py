"""`sglang.srt.plugins` entry point: make `--disaggregation-transfer-backend ampd` work in SGLang 0.5.23.

SGLang calls `register()` with no arguments, once, in every process that calls `load_plugins()` (the
launcher before it parses arguments, each scheduler, the detokenizer, the DP controller, `Engine`), then
applies the registered hooks. Three things are needed, none of which edits an SGLang file:

1. the CLI choice — `add_disagg_transfer_backend_choices(["ampd"])` (argparse holds the list by reference);
2. an `AMPD` member of the closed `TransferBackend` enum, because schedulers convert the flag with
   `TransferBackend(value)`; a real member (not an alias of MOONCAKE) keeps Mooncake-only code paths off;
3. an AROUND hook on `disaggregation.utils.get_kv_class` returning our classes for that member
   (HookRegistry also rebinds the `from ... import get_kv_class` copies in prefill/decode modules).

Plus the start-up checks (`checks`) and the local-prefill scheduler hooks (`local_prefill`).
SGLang is imported only inside `register()`, so importing this module never needs it.
"""

from __future__ import annotations

import logging
from importlib import metadata

from ampd_plugin.connector.sglang import BACKEND_NAME, SUPPORTED_SGLANG_VERSION

logger = logging.getLogger(__name__)

GET_KV_CLASS_TARGET = "sglang.srt.disaggregation.utils.get_kv_class"
RESOLVE_TARGET = "sglang.srt.server_args.ServerArgs.resolve_once"
ENUM_MEMBER_NAME = "AMPD"

_registered = False


def register() -> None:
    """Entry point; idempotent within a process."""
    global _registered
    if _registered:
        return
    try:
        from sglang.srt.disaggregation.utils import TransferBackend
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
        from sglang.srt.server_args import add_disagg_transfer_backend_choices
    except ImportError as exc:  # an SGLang without the plugin system (< 0.5.11)
        raise ImportError(
            f"the ampd SGLang plugin needs SGLang >= 0.5.11 (tested {SUPPORTED_SGLANG_VERSION}); "
            f"older versions need the patches under patches/. Import error: {exc}"
        ) from exc

    _warn_if_untested_version()
    add_cli_choice(add_disagg_transfer_backend_choices)
    add_enum_member(TransferBackend, ENUM_MEMBER_NAME, BACKEND_NAME)
    HookRegistry.register(GET_KV_CLASS_TARGET, get_kv_class_around, HookType.AROUND)

    from ampd_plugin.connector.sglang import checks, local_prefill

    HookRegistry.register(RESOLVE_TARGET, checks.check_after_resolution, HookType.AFTER)
    local_prefill.register_hooks(HookRegistry, HookType)
    _registered = True


def _warn_if_untested_version() -> None:
    try:
        version = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return
    if version != SUPPORTED_SGLANG_VERSION:
        logger.warning(
            "ampd SGLang plugin is tested with sglang==%s; found %s (the backend subclasses SGLang's "
            "internal PD classes, whose interface changes between 0.5.x releases)",
            SUPPORTED_SGLANG_VERSION,
            version,
        )


def add_cli_choice(add_choices) -> None:
    from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES

    if BACKEND_NAME not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_choices([BACKEND_NAME])


def add_enum_member(enum_cls, name: str, value: str):
    """Add `name = value` to a plain `Enum` after creation (the same way Enum builds its members)."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


def get_kv_class_around(original, transfer_backend, class_type):
    """`get_kv_class` for the ampd member; every other backend goes to SGLang's own lookup."""
    if getattr(transfer_backend, "value", transfer_backend) != BACKEND_NAME:
        return original(transfer_backend, class_type)
    from sglang.srt.disaggregation.utils import KVClassType

    if class_type == KVClassType.KVARGS:
        return original(transfer_backend, class_type)  # the one KVArgs container all backends share
    from ampd_plugin.connector.sglang import backend

    return {
        KVClassType.MANAGER: backend.AmpdKVManager,
        KVClassType.SENDER: backend.AmpdKVSender,
        KVClassType.RECEIVER: backend.AmpdKVReceiver,
        KVClassType.BOOTSTRAP_SERVER: backend.AmpdKVBootstrapServer,
    }.get(class_type)
