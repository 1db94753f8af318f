"""A small BPE tokenizer for the demo data, saved in the Hugging Face format.

Trained with the `tokenizers` library on the demo's prompts and rationales. Spaces become "▁"
and start the next token (as in sentencepiece), which makes `decode(encode(text)) == text`
exact for any text of printable ASCII and newlines: there is no normalisation. Each digit is
its own token, with or without the space before it ("▁1", "2" for " 12"), so numbers of any
size are spelled with 20 digit tokens and an answer span never shares a token with the
punctuation after it (with `whole_numbers`, a number's digits may merge into one token
instead, never with anything else). Punctuation is split off the same way ("▁=", "."), so
the word tokens are whole words. Characters outside the initial alphabet (printable ASCII, newline) become
`<unk>`.

The folder written by `save_pretrained` loads offline with
`mcckd_jax.data.tokenization.load_tokenizer(folder)` and `transformers.AutoTokenizer`; the
tokenizer adds BOS in front of a prompt (LLaMA's convention) and never adds EOS on its own
(`encode_records` appends it to rationales).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mcckd_jax import files
from mcckd_jax.data.tokenization import DEFAULT_PROMPT_TEMPLATE
from mcckd_jax.demo import problems

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": "<pad>"}
SPACE = "▁"
DEFAULT_VOCAB_SIZE = 512
# Every printable ASCII character has a token, so unseen words still encode without <unk>.
ALPHABET = tuple(chr(code) for code in range(32, 127)) + ("\n", SPACE)


def _pre_tokenizer(whole_numbers: bool = False) -> pre_tokenizers.PreTokenizer:
    digits = r"\d+" if whole_numbers else r"\d"
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never"),
        pre_tokenizers.Split(Regex(rf"{SPACE}?{digits}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(rf"{SPACE}?[^\w{SPACE}\s]"), behavior="isolated"),
    ])


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                    whole_numbers: bool = False) -> Tokenizer:
    """A BPE tokenizer trained on `texts`, with the special tokens first (ids 0-3: unk, bos,
    eos, pad) and a post-processor that puts BOS in front of each encoded text.

    With `whole_numbers`, BPE may merge the digits of a number (never a number with anything
    else), so the frequent small numbers become one token each ("▁23"): a tiny student then
    copies a quantity and looks up a sum as one token instead of spelling digits and carries.
    """
    special = list(SPECIAL_TOKENS.values())
    if vocab_size < len(special) + len(ALPHABET):
        raise ValueError(f"vocab_size must be at least {len(special) + len(ALPHABET)} (special "
                         f"tokens and the alphabet), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = _pre_tokenizer(whole_numbers)
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=list(ALPHABET), limit_alphabet=len(ALPHABET),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def corpus(rows: Sequence[Mapping[str, Any]],
           prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> list[str]:
    """Training text from MCC-KD records: each prompt as the student sees it, each rationale,
    and mcckd-prepare's answer sentence for each label (it ends every prepared rationale)."""
    texts = [prompt_template.format(question=row["instruction"]) for row in rows]
    for row in rows:
        outputs = row["output"]
        texts.extend([outputs] if isinstance(outputs, str) else outputs)
        texts.append(problems.REFERENCE_ENDING.format(answer=row["label"]))
    return texts


def save_pretrained(tokenizer: Tokenizer, folder: str | os.PathLike,
                    model_max_length: int = 512) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to `folder`,
    all three or none (`files.write_together`)."""
    folder = pathlib.Path(folder)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL_TOKENS,
              "model_max_length": model_max_length,
              # transformers would otherwise glue " ." and " 's" on decoding; decode is exact.
              "clean_up_tokenization_spaces": False}
    files.write_together({
        folder / "tokenizer.json": tokenizer.to_str(pretty=True),  # what Tokenizer.save writes
        folder / "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        folder / "special_tokens_map.json": json.dumps(SPECIAL_TOKENS, indent=2) + "\n"})
