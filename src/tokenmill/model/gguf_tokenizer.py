"""Tokenizer from a GGUF file's metadata, converted once and cached on disk by the file's hash.

The conversion itself is transformers' (`AutoTokenizer.from_pretrained(..., gguf_file=...)`), so token ids
are exactly what transformers gives for the same file. It is slow for big vocabularies (about 27 s for
Gemma 3's 262,144 tokens on 2 cores: Gemma GGUFs carry no merges, which get rebuilt from the
vocabulary), so the result is saved with save_pretrained under <cache>/gguf-tokenizer-v1/<sha256>/ and
later starts load that folder in a few seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenmill.model.cache_dir import get_or_build

CACHE_KIND = "gguf-tokenizer-v1"

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma-style chat template, used when a Gemma model brings none (the 270M base model has none)."""


def convert_gguf_tokenizer(gguf_path: str | Path) -> Any:
    """transformers' own GGUF tokenizer conversion (slow; not cached)."""
    from transformers import AutoTokenizer

    path = Path(gguf_path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def load_gguf_tokenizer(gguf_path: str | Path, file_hash: str) -> Any:
    """The file's tokenizer, from the cache when this file (by hash) was converted before.

    Reloaded as a plain fast tokenizer from the saved tokenizer.json: the class the conversion picked by
    architecture (e.g. GemmaTokenizer) would rebuild its own pipeline on load instead of the converted one,
    which is wrong for files whose vocabulary is not that family's (a byte-level BPE in a gemma3 file).
    """
    from transformers import PreTrainedTokenizerFast

    def build(tmp: Path) -> None:
        convert_gguf_tokenizer(gguf_path).save_pretrained(str(tmp))

    folder = get_or_build(CACHE_KIND, file_hash, build)
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
