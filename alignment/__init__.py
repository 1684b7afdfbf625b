"""An RLHF pipeline: SFT, reward model, PPO. Importing the package first quiets third-party noise that says nothing
to a user of this pipeline (stages import it before torch, transformers and peft):
- bitsandbytes warns at import, on CPUs with bf16 units, that an optional kernel package is missing, whether or
  not anything is quantized;
- deprecation notices about arguments this code does not choose (TRL's `keep_end`, which is how prompts lose their
  beginning here; DeepSpeed's use of a renamed torch.distributed call);
- progress bars, when the output is not a terminal: in a log file each redraw is a line of escape codes.
"""

import logging
import os
import sys
import warnings

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*'keep_end'.*truncation mode is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)

INTERACTIVE = sys.stderr.isatty()
if not INTERACTIVE:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's own switch: the trainers' bars and ours
