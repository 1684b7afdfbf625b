"""An RLHF pipeline: SFT, reward model, PPO. Importing the package quiets third-party noise that says nothing to a
user of this pipeline. It runs before any third-party import of a stage, whatever the order of the stage's imports:
`python -m stages.<stage>` imports the stages package first, and stages/__init__.py imports this one.
- bitsandbytes warns at import, on CPUs with bf16 units, that an optional kernel package is missing, whether or
  not anything is quantized;
- deprecation notices about arguments this code does not choose (TRL's `keep_end`, which is how prompts lose their
  beginning here; DeepSpeed's use of a renamed torch.distributed call);
- progress bars, when the output is not a terminal: in a log file each redraw is a line of escape codes;
- transformers' load report when a reward model or critic is made from a causal LM: the LM head unused and the
  new scalar head initialised, every time, by design (any other key it lists still shows).
"""

import logging
import os
import sys
import warnings

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*'keep_end'.*truncation mode is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)



class _ExpectedHeadSwap(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        keys = [
            line.split("|")[0].strip() for line in message.splitlines() if "| UNEXPECTED" in line or "| MISSING" in line
        ]
        return not keys or not all(k.startswith(("lm_head.", "embed_out.", "score.")) for k in keys)


logging.getLogger("transformers.modeling_utils").addFilter(_ExpectedHeadSwap())

INTERACTIVE = sys.stderr.isatty()
if not INTERACTIVE:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's own switch: the trainers' bars and ours
