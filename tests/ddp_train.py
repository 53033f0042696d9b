"""Run by test_train.py under torchrun: train, then save this rank's memories and teacher for comparison."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

trainer = train.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--output_dir") + 1]
torch.save({"class_memory": trainer.method.class_memory.memory, "class_ptr": trainer.method.class_memory.ptr,
            "patch_memory": trainer.method.patch_memory.memory, "teacher": torch.cat(
                [p.flatten() for p in trainer.teacher.parameters()])},
           os.path.join(out, f"rank{os.environ['RANK']}.pt"))
