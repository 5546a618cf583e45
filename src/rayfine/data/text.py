"""Text preprocessing shared by training (inside Ray Data ``map_batches``) and serving.

1. ``tokenize``: texts (and optional pair texts) -> token ids with the model's fast tokenizer,
   truncated to ``data.max_length``, not padded. Training materializes this once.
2. ``TextCollate``: pads a batch to its longest example (or to ``max_length``) and builds the
   attention mask. It runs as the ``collate_fn`` of ``iter_torch_batches`` in the training loop
   and in evaluation, and on every served request.

The tokenizer comes from the model directory while training and from the checkpoint (which
carries the tokenizer files) when serving, so a checkpoint alone serves with no network.
"""

from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from rayfine.config import DataConfig
from rayfine.errors import InputError

if TYPE_CHECKING:
    import torch

TOKEN_COLUMNS = ("input_ids", "token_type_ids")


def _files_stamp(source: str) -> tuple:
    """(name, size, modification time) of the files of a local directory, () for a hub id: a
    directory replaced at the same path (a checkpoint saved again) is a new cache entry."""
    if not os.path.isdir(source):
        return ()
    stamp = []
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        try:
            if entry.is_file():
                st = entry.stat()
                stamp.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            continue
    return tuple(stamp)


def load_tokenizer(source: str):
    """A fast tokenizer from a model directory, a checkpoint directory or a (cached) hub id; cached
    by the path and its files' sizes and modification times, so a directory replaced in place
    loads anew."""
    return _load_tokenizer(str(source), _files_stamp(str(source)))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(source: str, stamp: tuple):
    from transformers import AutoTokenizer

    from rayfine.models import quiet_transformers

    with quiet_transformers():
        # trust_remote_code=False: never the code a model directory names (transformers would ask on stdin).
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        # Decoder models (GPT-2, Llama) come without one; the usual fix reuses a token the model has:
        # a new one would need the model's embeddings resized, which rayfine does not do.
        eos = tokenizer.eos_token
        use = (f", e.g. its end-of-text token, as is usual for decoder models: \"pad_token\": {json.dumps(eos)}"
               if eos else "")
        raise InputError(f"the tokenizer of {source} has no padding token; set one in its tokenizer_config.json"
                         f"{use} (a token the model has: a new one would need its embeddings resized)")
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        # transformers 5 builds a tokenizer of the special tokens alone from a directory with a
        # config.json and no tokenizer files: every word would be [UNK] and nothing would be learnt.
        raise InputError(f"the tokenizer of {source} has no vocabulary but its special tokens (no tokenizer files "
                         "there?); copy the tokenizer files of the model it came from into it")
    return tokenizer


def tokenize(texts: list[str], pairs: Optional[list[str]], data_cfg: DataConfig, tokenizer) -> dict[str, list[np.ndarray]]:
    """Token ids per text, truncated, unpadded (the columns the model takes, minus the mask)."""
    wanted = [c for c in TOKEN_COLUMNS if c in tokenizer.model_input_names]
    encoded = tokenizer(
        list(texts),
        list(pairs) if pairs is not None else None,
        truncation=True,
        max_length=data_cfg.max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids="token_type_ids" in wanted,
    )
    return {c: [np.asarray(ids, dtype=np.int64) for ids in encoded[c]] for c in wanted}


def pad(features: dict[str, Any], pad_token_id: int, data_cfg: DataConfig, padding_side: str = "right",
        pad_token_type_id: int = 0) -> dict[str, np.ndarray]:
    """Pad variable-length token columns into a (batch, length) matrix plus attention_mask, on the
    tokenizer's ``padding_side`` and with its ``pad_token_type_id``, as ``tokenizer.pad`` does (an
    XLNet tokenizer pads on the left, and its model classifies from the last position)."""
    ids = list(features["input_ids"])
    length = data_cfg.max_length if data_cfg.padding == "max_length" else max((len(x) for x in ids), default=1)

    def place(matrix: np.ndarray, i: int, row) -> None:
        if padding_side == "left":
            matrix[i, length - len(row):] = row
        else:
            matrix[i, : len(row)] = row

    out: dict[str, np.ndarray] = {}
    for column in TOKEN_COLUMNS:
        if column not in features:
            continue
        fill = {"input_ids": pad_token_id, "token_type_ids": pad_token_type_id}.get(column, 0)
        matrix = np.full((len(ids), length), fill, dtype=np.int64)
        for i, row in enumerate(features[column]):
            place(matrix, i, row)
        out[column] = matrix
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for i, row in enumerate(ids):
        place(mask, i, np.ones(len(row), dtype=np.int64))
    out["attention_mask"] = mask
    return out


class TextCollate(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=...)``: pad token columns and turn everything into tensors,
    as ``tokenizer`` pads (its pad ids and ``padding_side``; only those are kept)."""

    def __init__(self, data_cfg: DataConfig, tokenizer):
        super().__init__()
        self.data_cfg = data_cfg
        self.pad_token_id = tokenizer.pad_token_id
        self.padding_side = tokenizer.padding_side
        self.pad_token_type_id = tokenizer.pad_token_type_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, "torch.Tensor"]:
        import torch

        padded = pad({c: batch[c] for c in TOKEN_COLUMNS if c in batch}, self.pad_token_id, self.data_cfg,
                     self.padding_side, self.pad_token_type_id)
        tensors = {k: torch.from_numpy(v) for k, v in padded.items()}
        if "y" in batch:
            tensors["y"] = torch.from_numpy(np.array(batch["y"], dtype=np.int64))
        return tensors


def check_texts(items: list, data_cfg: DataConfig, max_chars: Optional[int] = None) -> tuple[list[str], Optional[list[str]]]:
    """Validate request items: a string, or [text, pair] when the model takes sentence pairs."""
    texts, pairs = [], []
    for i, item in enumerate(items):
        if data_cfg.text_pair_column:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)):
                raise InputError(f"input {i}: this model takes text pairs: [text, pair]")
            text, pair = item
        else:
            if not isinstance(item, str):
                raise InputError(f"input {i}: expected a string, got {type(item).__name__}")
            text, pair = item, None
        for t in (text, pair):
            if t is not None and max_chars is not None and len(t) > max_chars:
                raise InputError(f"input {i}: text of {len(t)} characters exceeds the limit of {max_chars}")
        texts.append(text)
        pairs.append(pair)
    return texts, (pairs if data_cfg.text_pair_column else None)
