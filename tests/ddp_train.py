"""Run by test_train.py under torchrun: train, then save this rank's memories and teacher for comparison.
SOP_TEST_KILL_AT_STEP=N: rank 1 of the first attempt kills itself (SIGKILL) when it reaches step N."""
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

kill_at = int(os.environ.get("SOP_TEST_KILL_AT_STEP", -1))
if kill_at >= 0 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ["RANK"] == "1":
    step_once = train.Trainer.train_step

    def step_or_die(self, images, step, *args, **kwargs):  # a worker lost mid-run, as `kill -9` loses it
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step_once(self, images, step, *args, **kwargs)
    train.Trainer.train_step = step_or_die
trainer = train.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--output_dir") + 1]
torch.save({"class_memory": trainer.method.class_memory.memory, "class_ptr": trainer.method.class_memory.ptr,
            "patch_memory": trainer.method.patch_memory.memory, "teacher": torch.cat(
                [p.flatten() for p in trainer.teacher.parameters()])},
           os.path.join(out, f"rank{os.environ['RANK']}.pt"))
