"""Step 2 of the pipeline: estimate each target linear's gradient with the serial, block-bounded pass and keep
its truncated SVD (docs/DESIGN.md section 2).

- :mod:`.engine`: the pass (:func:`gradient_pass`, :func:`estimate_factors`); :mod:`.report`: :class:`PassReport`;
- :mod:`.sample`: the gradient sample in micro-batches, each process's share;
- :mod:`.store`: where the blocks' inputs live and at which stride (:func:`plan_state_store`);
- :mod:`.head`: the model's own loss head, from the last block's output;
- :mod:`.accumulate`: the fp32 gradient buffers and the hooks that fill them;
- :mod:`.reduce`: a finished block's gradients -> their SVDs, over one process or several;
- :mod:`.svd`: the truncated SVD (:class:`Factors`) and the rank check.
"""

from .engine import estimate_factors, gradient_pass
from .report import PassReport
from .sample import make_micro_batches, split_sample
from .store import StorePlan, describe_plan, plan_state_store
from .svd import Factors, check_rank, has_no_gradient, svd_reducer, truncated_svd

__all__ = ["Factors", "PassReport", "StorePlan", "check_rank", "describe_plan", "estimate_factors", "gradient_pass",
           "has_no_gradient", "make_micro_batches", "plan_state_store", "split_sample", "svd_reducer", "truncated_svd"]
