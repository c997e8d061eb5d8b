"""Load a tinygpt model directory with Hugging Face transformers and score packed blocks.

    python hf_loss.py MODEL_DIR BLOCKS.arrow [MODEL_DIR BLOCKS.arrow ...]

MODEL_DIR is a `pretrain` artifact (model.safetensors, config.json); BLOCKS.arrow is a `pack`
split (rows of T + 1 token ids). Prints one JSON object per pair, one per line: the class
transformers chose, the mean cross-entropy of every row's tokens 1.. given the ones before
(padding excluded), which tinygpt's `evaluate` reports as `val_loss` for the same blocks, and
how many tokens it scored. Loading is strict: a missing, unexpected or
misshapen weight is an error, not a silently initialised one.

Uses transformers' Flax classes (JAX on the CPU), which read safetensors without PyTorch.
"""

import json
import logging
import sys

import numpy as np
import pyarrow.ipc as ipc
from transformers import AutoConfig, FlaxAutoModelForCausalLM


class Complaints(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "not used" in message or "newly initialized" in message or "mismatch" in message:
            self.messages.append(message)


def val_loss(model_dir, blocks_path):
    complaints = Complaints()
    logger = logging.getLogger("transformers")
    logger.addHandler(complaints)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type == "llama":
        # The Flax port of llama cuts its (positions, 2 * head_dim) sin/cos table to
        # max_position_embeddings columns, and always rotates with theta 10000: widen the
        # table (llama learns no positions, so no weight depends on it) and check theta.
        head_dim = config.hidden_size // config.num_attention_heads
        config.max_position_embeddings = max(config.max_position_embeddings, 2 * head_dim)
        if config.rope_theta != 10000:
            sys.exit(f"{model_dir}: the Flax llama supports rope_theta 10000 only, not {config.rope_theta}")
    try:
        model = FlaxAutoModelForCausalLM.from_pretrained(model_dir, config=config, from_pt=True)
    finally:
        logger.removeHandler(complaints)
    tied_llama = config.model_type == "llama" and config.tie_word_embeddings
    if tied_llama:
        # PyTorch's LlamaForCausalLM ties lm_head to embed_tokens; the Flax port always reads
        # a separate lm_head, so it reports it missing. Tie it here, as PyTorch would.
        only_lm_head = "newly initialized: {('lm_head', 'kernel')}"
        complaints.messages = [m for m in complaints.messages if only_lm_head not in m]
        params = model.params
        params["lm_head"]["kernel"] = params["model"]["embed_tokens"]["embedding"].T
        model.params = params
    if complaints.messages:
        sys.exit(f"transformers complained while loading {model_dir}:\n" + "\n".join(complaints.messages))

    table = ipc.open_file(blocks_path).read_all()
    column = table.column("tokens").combine_chunks()
    width = column.type.list_size
    rows = column.values.to_numpy().astype(np.int32).reshape(-1, width)
    # `pack` fills a split's last block with end-of-text tokens and counts them in the schema
    # metadata: inputs, never targets.
    padding = int((table.schema.metadata or {}).get(b"padding", b"0"))
    scored = np.ones((len(rows), width - 1), dtype=bool)
    if padding:
        scored[-1, width - 1 - padding :] = False

    total, count = 0.0, 0
    for start in range(0, len(rows), 16):
        batch = rows[start : start + 16]
        keep = scored[start : start + 16]
        logits = np.asarray(model(batch[:, :-1]).logits, dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        lse = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
        target = np.take_along_axis(logits, batch[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
        total += float((lse - target)[keep].sum())
        count += int(keep.sum())
    return {"class": type(model).__name__, "val_loss": total / count, "tokens": count}


def main():
    args = sys.argv[1:]
    if not args or len(args) % 2:
        sys.exit(__doc__)
    for model_dir, blocks_path in zip(args[::2], args[1::2]):
        print(json.dumps(val_loss(model_dir, blocks_path)), flush=True)


if __name__ == "__main__":
    main()
