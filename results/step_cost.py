"""CPU seconds per training step of each method at the cpu_demo settings (one thread, process CPU time).

Process CPU time rather than wall-clock, so that the figure holds on a shared machine:
    python results/step_cost.py            # prints one line per method; ~1 min alone
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)
images = data.load_dataset("synthetic", "", "train", size=128).images  # one cpu_demo batch (128 images)
for method in sys.argv[1:] or ["sop", "ibot", "dino", "massl", "carp"]:
    cfg = train.parse_config(["--preset", "cpu_demo", "--method", method])
    trainer = train.Trainer(cfg, torch.device("cpu"), 1, steps_per_epoch=78)
    for step in range(2):  # warm-up
        trainer.train_step(images, 100 + step)
    start, steps = time.process_time(), 5
    for step in range(steps):
        trainer.train_step(images, 200 + step)
    seconds = (time.process_time() - start) / steps
    print(f"{method}: {seconds:.3f} CPU s/step, {128 / seconds:.0f} images per CPU second", flush=True)
