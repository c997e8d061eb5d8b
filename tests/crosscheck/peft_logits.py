"""Load a base model and a tinygpt LoRA adapter with Hugging Face PEFT and print its logits.

    python peft_logits.py BASE_DIR ADAPTER_DIR ID [ID ...]

BASE_DIR is the `pretrain` artifact the adapter was trained on; ADAPTER_DIR is the `adapter/`
directory of an `sft` artifact (adapter_config.json, adapter_model.safetensors). Prints one
JSON object: the logits (a list per position) of the token ids given, from
`PeftModel.from_pretrained(base, ADAPTER_DIR)`. Every adapter tensor must load: a missing or
unexpected key is an error.

Needs torch, transformers and peft (PyTorch is not installed by .ci/run: it is a large
download; the test says it skips without them).
"""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    base_dir, adapter_dir, *ids = sys.argv[1:]
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    adapted = [n for n, _ in model.named_parameters() if "lora_" in n]
    if not adapted:
        sys.exit(f"{adapter_dir}: PEFT attached no LoRA weights")
    with torch.no_grad():
        logits = model(torch.tensor([[int(i) for i in ids]])).logits[0]
    print(json.dumps({"logits": logits.tolist(), "lora_tensors": len(adapted)}))


if __name__ == "__main__":
    main()
