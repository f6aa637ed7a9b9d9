"""`loraserve serve` with a model that fails inside the engine step, as a kernel bug would: any forward pass that
computes a position at or past $LORASERVE_TEST_FAULT_POSITION raises. A request with a long prompt marks itself."""
import os
import sys

import torch

from loraserve.cli import main
from loraserve.model.llama import LlamaModel

FAULT_POSITION = int(os.environ["LORASERVE_TEST_FAULT_POSITION"])
real_forward = LlamaModel.forward


def faulty_forward(self: LlamaModel, input_ids: torch.Tensor, positions: torch.Tensor, *args, **kwargs
                   ) -> torch.Tensor:
    if int(positions.max()) >= FAULT_POSITION:
        raise RuntimeError(f"injected fault: position {int(positions.max())} reached the model")
    return real_forward(self, input_ids, positions, *args, **kwargs)


LlamaModel.forward = faulty_forward

if __name__ == "__main__":
    main(sys.argv[1:])
