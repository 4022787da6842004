"""The models a worker can host: the embedded tiny GPT-2, or any local Hugging Face directory.

``path(spec)`` turns a spec into a directory that a plain
``nnsight.TransformersModel(path, task="text-generation")`` (or the deprecated
``nnsight.LanguageModel(path)``) and ``transformers.AutoTokenizer.from_pretrained(path)``
open with no hub access, so a client and the worker open the very same model.
``load(spec, device)`` is what the worker holds: an nnsight model over that directory with
its weights already loaded. Importing this module fixes, once, the transformers registry
entry nnsight 0.8.1 misreads (see `_let_nnsight_find_local_tokenizers`); ``path`` itself
is a pure lookup.

The embedded specs are built offline on first use (a byte-level BPE tokenizer trained
with ``tokenizers`` on a built-in text, a GPT-2 whose weights come from a seeded
generator) and cached under ``$SOURCEBOX_CACHE/models`` (default
``~/.cache/sourcebox/models``) in a directory named after the spec and a hash of the
recipe, so a changed recipe never reuses a stale build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

DEFAULT_SPEC = "tiny-gpt2"

# Bumped whenever the build changes in a way the recipe fields below do not capture.
_RECIPE_FORMAT = 1
_SEED = 20240617
_DEFAULT_LAYERS = 2
_MAX_LAYERS = 64
_SPEC_PATTERN = re.compile(r"^tiny-gpt2(?:-(\d+)l)?$")
_BUILT_NAME = re.compile(r"^tiny-gpt2(?:-\d+l)?-[0-9a-f]{12}$")
_EOS = "<|endoftext|>"

# Training text for the tokenizer. Its only job is to give the BPE merges something
# realistic to learn; the byte-level alphabet still tokenizes any input.
_CORPUS = """\
Hello world. The quick brown fox jumps over the lazy dog while the cat sleeps.
A language model reads a sequence of tokens and predicts the next one.
Researchers open the model, read its hidden states, and edit them to see what changes.
The Eiffel Tower is in Paris. The Colosseum is in Rome. The Brandenburg Gate is in Berlin.
One, two, three, four, five, six, seven, eight, nine, ten.
Attention layers mix information between positions; the MLP layers work on each position.
When the residual stream is patched from a clean run into a corrupted one, the answer returns.
She said that the experiment worked, and he wrote the result in his notebook.
Numbers such as 12, 256 and 1024 appear in code; words such as def, return and import too.
The weather today is sunny with a light breeze, and tomorrow it may rain in the afternoon.
"""


class UnknownModelSpec(ValueError):
    """A model spec that is neither an embedded model nor an existing local directory."""


def valid_specs() -> str:
    """Human-readable description of the specs ``path`` accepts."""
    return (
        f"'{DEFAULT_SPEC}' ({_DEFAULT_LAYERS} layers), "
        f"'tiny-gpt2-<N>l' (N layers, 1 to {_MAX_LAYERS}, e.g. 'tiny-gpt2-12l'), "
        "or the path of an existing local Hugging Face model directory"
    )


def path(spec: str = DEFAULT_SPEC, *, build: bool = True) -> str | None:
    """Return a local directory holding the model named by ``spec``, building it if needed.

    ``spec`` is ``"tiny-gpt2"``, ``"tiny-gpt2-<N>l"`` or an existing local directory
    (returned as an absolute path). Embedded models are built once per recipe and cached;
    concurrent first use from several processes is safe (each builds in a private
    temporary directory and the first atomic rename wins). ``build=False``: return ``None``
    instead of building a missing embedded model (a build starts threads).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model spec must be a string or path, got {type(spec).__name__}; use {valid_specs()}")
    spec_text = os.fspath(spec)
    if os.path.isdir(spec_text):
        return os.path.abspath(spec_text)
    layers = _embedded_layers(spec_text)
    recipe = _recipe(layers)
    target = _cache_root() / f"{spec_text}-{_recipe_version(recipe)}"
    if not target.is_dir():
        if not build:
            return None
        _build_atomically(target, recipe)
    return str(target)


def load(spec: str = DEFAULT_SPEC, device: str = "cpu"):
    """Load the model named by ``spec`` as the nnsight model a worker holds.

    Returns an ``nnsight`` ``TransformersModel`` (the non-deprecated name of
    ``LanguageModel``) for text generation, with real weights already on ``device``
    (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``: CUDA when available).
    """
    import torch
    from nnsight.modeling.transformers import TransformersModel

    resolved = _resolve_device(device, torch)
    directory = path(spec)
    placement = {} if resolved == "cpu" else {"device_map": resolved}
    # dispatch=True loads the weights now instead of at the first trace, so the
    # worker pays the load before it takes requests.
    with _no_progress_bars():
        return TransformersModel(directory, task="text-generation", dispatch=True, **placement)


@contextlib.contextmanager
def _no_progress_bars():
    """Hide transformers' progress bars ("Loading weights", "Writing model shards") meanwhile.

    Only the bars: transformers' warnings (missing or unexpected weights, ...) go through
    its logger and still reach the user.
    """
    from transformers.utils import logging as transformers_logging

    if not transformers_logging.is_progress_bar_enabled():
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def _resolve_device(device: str, torch) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device or ""):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device; use device='cpu'")
        return device
    raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")


def _embedded_layers(spec: str) -> int:
    match = _SPEC_PATTERN.match(spec)
    if match is None:
        looks_like_path = os.sep in spec or spec.startswith(".")
        problem = f"no directory at {spec!r}" if looks_like_path else f"unknown model spec {spec!r}"
        raise UnknownModelSpec(f"{problem}; valid specs are {valid_specs()}")
    layers = int(match.group(1)) if match.group(1) else _DEFAULT_LAYERS
    if not 1 <= layers <= _MAX_LAYERS:
        raise UnknownModelSpec(f"model spec {spec!r} asks for {layers} layers; valid specs are {valid_specs()}")
    return layers


def _recipe(layers: int) -> dict:
    return {
        "format": _RECIPE_FORMAT,
        "seed": _SEED,
        "corpus_sha256": hashlib.sha256(_CORPUS.encode()).hexdigest(),
        "vocab_size": 512,
        "config": {
            "n_layer": layers,
            "n_embd": 64,
            "n_head": 4,
            "n_positions": 256,
            # No dropout: the same input gives the same activations every time.
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
    }


def _recipe_version(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _cache_root() -> Path:
    base = os.environ.get("SOURCEBOX_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "sourcebox"
    return root / "models"


def _build_atomically(target: Path, recipe: dict) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        _build(staging, recipe)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its build is identical (seeded).
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build(directory: Path, recipe: dict) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=recipe["vocab_size"],
        special_tokens=[_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=_EOS, eos_token=_EOS, unk_token=_EOS)
    eos_id = tokenizer.convert_tokens_to_ids(_EOS)

    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        **recipe["config"],
    )
    model = GPT2LMHeadModel(config)
    _fill_seeded(model, recipe["seed"], torch)
    model.generation_config.pad_token_id = eos_id
    with _no_progress_bars():  # its "Writing model shards" bar
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _fill_seeded(model, seed: int, torch) -> None:
    """Overwrite every parameter from one seeded generator, in name order.

    The values then depend on the seed and the torch CPU generator only, not on
    transformers' initialisation code, which changes between releases.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
            elif parameter.dim() == 1:  # LayerNorm gains
                parameter.copy_(1.0 + torch.randn(parameter.shape, generator=generator) * 0.01)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def _let_nnsight_find_local_tokenizers() -> None:
    """Work around nnsight 0.8.1 not loading any tokenizer under transformers >= 5.

    nnsight decides which preprocessors a task needs by reading the ``_load_tokenizer``
    flag off the task's pipeline class, but transformers 5 registers that class as a
    dotted-path string, so nnsight sees no flag and builds its meta pipeline without a
    tokenizer ("Impossible to guess which tokenizer to use") for every model, local or
    not. Resolving the string to the class it names (what ``pipeline()`` does itself on
    every call) restores the plain ``TransformersModel(path, task="text-generation")``
    and ``LanguageModel(path)``. Nothing else changes. Done once, when this module is
    imported (and only if transformers is installed).
    """
    try:
        from transformers.pipelines import _resolve_impl, check_task
    except ImportError:  # no transformers, or an older one that registers classes directly
        return
    task = check_task("text-generation")[1]
    if isinstance(task.get("impl"), str):
        task["impl"] = _resolve_impl(task["impl"])


_let_nnsight_find_local_tokenizers()


def identity(directory: str) -> str:
    """The name a client and a worker compare to agree they hold the same model.

    An embedded build is named by its directory (spec plus recipe hash), wherever its
    cache lives; any other model by its resolved path.
    """
    name = os.path.basename(os.path.normpath(directory))
    if _BUILT_NAME.match(name):
        return name
    return os.path.realpath(directory)
