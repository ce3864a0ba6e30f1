"""Random-weight Llama models in GGUF, made here, for real engines in tests and benchmarks.

No model hub is reachable from the machines this project is built on, so a model is written
with the ``gguf`` package: the llama architecture, random f16 weights drawn from a fixed seed,
and a real tokenizer copied from a vocab-only GGUF that the pinned llama.cpp source ships. The
text it generates is gibberish, but deterministic at temperature 0; what matters is the
engine's real HTTP, tokenizer, prefix cache and metrics, and a prefill time that grows with
the prompt.

Invariants:

- A model file is named by its spec's name and a key of everything that shapes its bytes
  (the spec, the vocabulary file's content, this writer's format number), so a changed
  parameter makes a new file and an unchanged one is written once.
- The vocabulary's end-of-generation rows of the output matrix are zero: with random weights
  the other logits spread on both sides of zero, so greedy decoding (temperature 0) never
  picks an end token and a request generates the ``max_tokens`` it asked for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts.engine import cache

# Bump when the writer changes what it writes for the same spec: every model is made anew.
FORMAT = 1
# The vocabulary: LLaMA's SentencePiece tokenizer, 32,000 tokens (the BPE one has 128,256,
# which alone would make the big model's embeddings 128 MB).
VOCAB_FILE = "ggml-vocab-llama-spm.gguf"
# Llama 2's chat format, which llama-server also recognises by its ``[INST]`` marker. The
# vocab-only files carry no template; without one the server would fall back to its default.
# No ``bos_token`` here: the tokenizer adds it (add_bos_token), and twice would be wrong.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
_COPIED_PREFIX = "tokenizer."
_INIT_STD = 0.02


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape of one random Llama; ``name`` is also what the engine serves it as."""

    name: str
    layers: int
    width: int
    heads: int
    kv_heads: int
    ffn: int
    context: int
    seed: int

    def key(self, vocab_digest: str) -> str:
        """A short key of everything that shapes the file's bytes."""
        fields = {**asdict(self), "format": FORMAT, "vocab": vocab_digest, "chat": CHAT_TEMPLATE}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return digest[:16]


SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # Starts in about a second and generates fast: the end-to-end tests' model.
        ModelSpec(
            "llama-tiny", layers=2, width=64, heads=2, kv_heads=2, ffn=128, context=16384, seed=16
        ),
        # About 108 MB: prefill is slow enough on a CPU that a cached prefix shows in time.
        ModelSpec(
            "llama-big", layers=8, width=512, heads=8, kv_heads=8, ffn=1024, context=16384, seed=16
        ),
    )
}


def models_dir() -> Path:
    return cache.root() / "models"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def path_of(spec: ModelSpec, vocab: Path) -> Path:
    """Where the model of ``spec`` with the tokenizer of ``vocab`` is (or will be) kept."""
    return models_dir() / f"{spec.name}-{spec.key(_digest(vocab))}.gguf"


def make(spec: ModelSpec, vocab: Path, progress: cache.Progress = cache.say) -> Path:
    """The model file of ``spec``, written first if it is not in the cache yet."""
    path = path_of(spec, vocab)
    if path.exists():
        return path
    with cache.locked(path.with_suffix(".lock"), f"model {spec.name}"):
        if path.exists():  # another process wrote it while we waited
            return path
        progress(f"model {spec.name}: writing {path.name}")
        made = cache.partial(path)
        try:
            _write(spec, vocab, made)
        except BaseException:
            made.unlink(missing_ok=True)
            raise
        return cache.publish(made, path)


def _write(spec: ModelSpec, vocab: Path, out: Path) -> None:
    # numpy and gguf come with the test extras; imported here so that the other commands
    # (building the engine, say) work without them.
    import gguf
    import numpy as np

    if spec.width % spec.heads or spec.heads % spec.kv_heads:
        raise cache.EngineUnavailable(f"model {spec.name}: heads must divide width and kv_heads")
    reader = gguf.GGUFReader(vocab)
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(spec.name)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.width)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.ffn)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_dimension_count(spec.width // spec.heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    n_vocab = 0
    end_tokens: list[int] = []
    for name, field in reader.fields.items():
        if not name.startswith(_COPIED_PREFIX):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(name, value, value_type, sub_type)
        if name == gguf.Keys.Tokenizer.LIST:
            n_vocab = len(value)
        elif name in (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID):
            end_tokens.append(int(value))
    if not n_vocab:
        raise cache.EngineUnavailable(f"{vocab.name} holds no token list")
    writer.add_vocab_size(n_vocab)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(spec.seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        drawn = rng.standard_normal((rows, cols), dtype=np.float32) * _INIT_STD
        return drawn.astype(np.float16)

    def ones() -> np.ndarray:
        return np.ones(spec.width, dtype=np.float32)  # norms stay f32, as converters write them

    kv_width = spec.width // spec.heads * spec.kv_heads
    writer.add_tensor("token_embd.weight", matrix(n_vocab, spec.width))
    for i in range(spec.layers):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", ones())
        writer.add_tensor(f"{block}.attn_q.weight", matrix(spec.width, spec.width))
        writer.add_tensor(f"{block}.attn_k.weight", matrix(kv_width, spec.width))
        writer.add_tensor(f"{block}.attn_v.weight", matrix(kv_width, spec.width))
        writer.add_tensor(f"{block}.attn_output.weight", matrix(spec.width, spec.width))
        writer.add_tensor(f"{block}.ffn_norm.weight", ones())
        writer.add_tensor(f"{block}.ffn_gate.weight", matrix(spec.ffn, spec.width))
        writer.add_tensor(f"{block}.ffn_up.weight", matrix(spec.ffn, spec.width))
        writer.add_tensor(f"{block}.ffn_down.weight", matrix(spec.width, spec.ffn))
    writer.add_tensor("output_norm.weight", ones())
    output = matrix(n_vocab, spec.width)
    output[end_tokens] = 0  # see the module's docstring: never an early end at temperature 0
    writer.add_tensor("output.weight", output)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
