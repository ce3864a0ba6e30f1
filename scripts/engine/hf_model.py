"""Random-weight Llama models in the Hugging Face layout, made here, for vLLM in tests.

No model hub is reachable from the machines this project is built on, so a model is made
locally: a byte-level BPE tokenizer trained with ``tokenizers`` on text generated from a fixed
seed, and a ``transformers`` Llama with random weights drawn from a fixed seed, saved as
safetensors beside its ``config.json`` and a ``tokenizer_config.json`` that carries the chat
template. The text it generates is gibberish, but deterministic at temperature 0; what matters
is the engine's real HTTP, tokenizer, prefix cache and metrics.

Invariants:

- The project's own environment never imports torch, transformers or tokenizers: the model
  is written by :data:`GENERATOR`, a script run as a child by the Python of an environment
  that has them (the vLLM environment, see ``scripts.engine.vllm``), under a timeout.
- A model folder is named by its spec's name and a key of everything that shapes its files
  (the spec, this writer's format number, the generator's source), so a changed parameter
  makes a new folder and an unchanged one is made once. It appears by a rename of a complete
  folder, under a lock: if it exists, it is whole.
- The head size is 64 (``width / heads``): vLLM's CPU attention kernels support only a few
  head sizes, and 64 is the smallest of them.
- The output rows of the special tokens (end of text, end of turn, ...) are zero: with random
  weights the other logits spread on both sides of zero, so greedy decoding (temperature 0)
  never picks an end token and a request generates the ``max_tokens`` it asked for.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts.engine import cache

# Bump when what is written for the same spec changes in a way the generator's source does not
# show (it is part of the key too).
FORMAT = 1
GENERATE_TIMEOUT_S = 600.0  # about 10 s here: importing torch and transformers is most of it

# The chat format: ChatML, whose markers are special tokens of the trained vocabulary. The end
# of a turn is the end-of-generation token (eos), as in models that use this format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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
    vocab: int  # the BPE trainer's target; the trained vocabulary may come out smaller
    seed: int

    def key(self) -> str:
        """A short key of everything that shapes the model's files."""
        fields = {**asdict(self), "format": FORMAT, "chat": CHAT_TEMPLATE, "gen": GENERATOR}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return digest[:16]


SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # Two layers of 128 with two heads of 64: vLLM loads it in a blink, and one token of
        # KV cache is 1 KiB (2 layers x K and V x 2 heads x 64 x 2 bytes of bfloat16).
        ModelSpec(
            "vllm-tiny",
            layers=2,
            width=128,
            heads=2,
            kv_heads=2,
            ffn=256,
            context=4096,
            vocab=1024,
            seed=16,
        ),
    )
}


def path_of(cache_root: Path, spec: ModelSpec) -> Path:
    """Where the model of ``spec`` is (or will be) kept under ``cache_root``."""
    return cache_root / "models" / f"{spec.name}-{spec.key()}"


def make(
    python: Path, cache_root: Path, spec: ModelSpec, progress: cache.Progress = cache.say
) -> Path:
    """The model folder of ``spec``, written first by ``python`` (an interpreter with torch,
    transformers and tokenizers) if it is not in the cache yet."""
    path = path_of(cache_root, spec)
    if (path / "config.json").is_file():
        return path
    with cache.locked(path.with_name(path.name + ".lock"), f"model {spec.name}"):
        if (path / "config.json").is_file():  # another process made it while we waited
            return path
        if spec.width % spec.heads or spec.heads % spec.kv_heads:
            raise cache.EngineUnavailable(f"model {spec.name}: heads must divide width")
        progress(f"model {spec.name}: writing {path.name}")
        made = cache.partial(path)
        shutil.rmtree(made, ignore_errors=True)
        try:
            cache.run(
                [str(python), "-c", GENERATOR, json.dumps(asdict(spec)), CHAT_TEMPLATE, str(made)],
                step=f"writing model {spec.name}",
                log_path=path.with_name(path.name + ".log"),
                timeout_s=GENERATE_TIMEOUT_S,
                # Nothing from a hub: a download attempt fails at once instead of waiting.
                env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            )
            if not (made / "config.json").is_file():
                raise cache.EngineUnavailable(f"model {spec.name}: the generator wrote no model")
        except BaseException:
            shutil.rmtree(made, ignore_errors=True)
            raise
        shutil.rmtree(path, ignore_errors=True)  # a folder left without its config.json
        return cache.publish(made, path)


# The generator, run as ``python -c GENERATOR <spec JSON> <chat template> <output folder>`` by
# an interpreter that has torch, transformers and tokenizers. It is a string, not a module, so
# that nothing in the project's environment (mypy, import-linter, pytest) ever imports them.
GENERATOR = r"""
import json, random, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

spec = json.loads(sys.argv[1])
template = sys.argv[2]
out = Path(sys.argv[3])
out.mkdir(parents=True)

# Training text: pseudo-words of random syllables, with digits and punctuation, from the seed.
rng = random.Random(spec["seed"])
syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
def word():
    if rng.random() < 0.1:
        return str(rng.randrange(1000))
    return "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
lines = [
    " ".join(word() for _ in range(rng.randint(5, 30))) + rng.choice([".", "?", "!", ","])
    for _ in range(4000)
]
specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=spec["vocab"],
    special_tokens=specials,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes, byte by byte
    show_progress=False,
)
tokenizer.train_from_iterator(lines, trainer)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    bos_token="<s>",
    eos_token="<|im_end|>",
    unk_token="<unk>",
    pad_token="</s>",
    additional_special_tokens=["<|im_start|>"],
)
fast.chat_template = template
fast.save_pretrained(out)
# The chat template inside tokenizer_config.json (this transformers writes it to a file of its
# own, which older readers do not look for); the class named plainly.
config_path = out / "tokenizer_config.json"
config = json.loads(config_path.read_text())
config["chat_template"] = template
config["tokenizer_class"] = "PreTrainedTokenizerFast"
config_path.write_text(json.dumps(config, indent=2) + "\n")
(out / "chat_template.jinja").unlink(missing_ok=True)

torch.manual_seed(spec["seed"])
end_ids = [fast.convert_tokens_to_ids(t) for t in specials]
model_config = LlamaConfig(
    vocab_size=len(fast),
    hidden_size=spec["width"],
    intermediate_size=spec["ffn"],
    num_hidden_layers=spec["layers"],
    num_attention_heads=spec["heads"],
    num_key_value_heads=spec["kv_heads"],
    head_dim=spec["width"] // spec["heads"],
    max_position_embeddings=spec["context"],
    bos_token_id=fast.bos_token_id,
    eos_token_id=fast.eos_token_id,
    pad_token_id=fast.pad_token_id,
    tie_word_embeddings=False,
    dtype="bfloat16",
)
model = LlamaForCausalLM(model_config).to(torch.bfloat16)
with torch.no_grad():
    for token_id in end_ids:
        model.lm_head.weight[token_id].zero_()  # see the module's docstring
model.save_pretrained(out, safe_serialization=True)
print(f"vocabulary {len(fast)}, parameters {sum(p.numel() for p in model.parameters())}")
"""
