"""Build a tiny random Llama with a trained BPE tokenizer and a chat template — a real HF model directory
that vLLM can serve, for tests and the demo on machines that cannot download weights.

Why these choices: a large ``initializer_range`` (0.3) makes greedy output depend strongly on the context
(with the default 0.02 the model repeats one token whatever the prompt, which would make KV-correctness
tests blind); GQA (fewer KV heads than query heads) exercises the same KV layout as real models; the
tokenizer is trained on text every Debian/Python install has, so the model is buildable offline. The
output directory is keyed by every parameter, builds are atomic and locked, and seeds are fixed, so the
same parameters always give the same model.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import click

# `strip_earlier_thinking` (a chat_template_kwargs switch, off by default) renders every assistant turn but
# the latest without its `<think>…</think>` part, as reasoning models' templates do: the re-rendered history
# is then not a prefix of what the decode worker holds (tests of the router's common-prefix reuse).
CHAT_TEMPLATE = (
    "{% set ns = namespace(last=-1) %}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if strip_earlier_thinking and message['role'] == 'assistant' and loop.index0 != ns.last "
    "and '</think>' in message['content'] %}{{ message['content'].split('</think>')[-1] }}"
    "{% else %}{{ message['content'] }}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|unk|>", "<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
BUILD_VERSION = 2  # bump when the recipe changes, so caches rebuild


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines the model; the cache key is a hash of it."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 4096
    max_position_embeddings: int = 4096
    initializer_range: float = 0.3
    seed: int = 1234

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V for every layer and KV head (bf16 by default; 4 for float32, as TP tests serve it)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def key(self) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "build": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


PRESETS = {
    # Small and fast: the shared integration-test model (2 layers, 2 KV heads x 32 → 512 B of KV per token).
    "tiny": TinyModelSpec(),
    # For the 8k-context transfer benchmark: 4 layers x 8 KV heads x 32 → 4 KiB of KV per token.
    "bench": TinyModelSpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8, intermediate_size=512,
                           max_position_embeddings=10240),
    # One KV head (MQA): with tensor parallelism every rank holds a replica of it (replicated-KV transfers).
    "mqa": TinyModelSpec(num_kv_heads=1),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("AMPD_CACHE_DIR", Path.home() / ".cache" / "ampd-plugin")) / "tiny-models"


def _training_files() -> list[str]:
    """Local, always-present text: license texts and Python's own standard library (sorted: deterministic)."""
    files = sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p))
    stdlib = sysconfig.get_paths()["stdlib"]
    files += sorted(glob.glob(os.path.join(stdlib, "*.py")))[:200]
    files = [f for f in files if os.path.getsize(f) > 0]
    if not files:
        raise RuntimeError("no local text found to train the tokenizer on")
    return files


def _train_tokenizer(spec: TinyModelSpec, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(_training_files(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|unk|>", bos_token="<|bos|>",
                                   eos_token="<|end|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _build_model(spec: TinyModelSpec, vocab_size: int, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, initializer_range=spec.initializer_range,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)


def build_tiny_model(spec: TinyModelSpec | str = "tiny", cache_dir: Path | str | None = None) -> Path:
    """Return the directory of the model for ``spec`` (a preset name or a spec), building it if needed."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown tiny-model preset {spec!r}; known: {sorted(PRESETS)}")
        spec = PRESETS[spec]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"llama-{spec.key()}"
    if (target / "config.json").exists():
        return target
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            _train_tokenizer(spec, tmp)
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(tmp))
            _build_model(spec, vocab, tmp)
            (tmp / "ampd_tiny_model.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1))
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@click.command("build-tiny-model")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Copy the model here (default: print the cache directory it was built in).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="tiny: fast test model; bench: 4 KiB KV/token, 10k context, for transfer benchmarks; "
                   "mqa: tiny with one KV head (replicated KV under tensor parallelism).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where built models are cached (default $AMPD_CACHE_DIR/tiny-models or ~/.cache/ampd-plugin).")
def build_tiny_model_cmd(out: str | None, preset: str, cache_dir: str | None) -> None:
    """Build a tiny random Llama + BPE tokenizer + chat template that vLLM can serve (no download)."""
    path = build_tiny_model(preset, cache_dir)
    if out:
        if Path(out).exists():
            raise click.ClickException(f"{out} already exists")
        shutil.copytree(path, out)
        path = Path(out)
    click.echo(str(path))
