#!/usr/bin/env python
"""Train a MiraGe detector (the `mirage-train` command; `mirage-eval` evaluates a saved one). With no arguments: the offline demo
(the `demo` preset shipped in mirage_hf/configs).

python train.py                                   # offline demo: tiny CLIP, generated data, a few minutes on CPU
python train.py --config genimage_sd14 --dataset genimage:/data/GenImage
accelerate launch --multi_gpu train.py --config genimage_sd14 ...
mirage-eval --model outputs/demo/model --dataset genimage:/data/GenImage --robustness
"""

from mirage_hf.training import script

if __name__ == "__main__":
    script()
