"""Activation criterion: mean |h_t,j| of each hidden unit over the calibration windows.

A unit whose output stays near zero contributes little to the next layer or the decoder whatever its
weights; this is the LSTM analogue of activation-magnitude channel pruning. One forward pass.
"""

from __future__ import annotations

import torch

from minillm.lstm.calibrate import activation_means
from minillm.lstm.criteria.base import ScoreContext
from minillm.lstm.groups import rnn_output_key
from minillm.lstm.model import LstmLm


def score(model: LstmLm, ctx: ScoreContext) -> list[torch.Tensor]:
    if not ctx.calib:
        raise ValueError("the activation criterion needs calibration windows")
    means = activation_means(model, ctx.calib)
    return [means[rnn_output_key(layer)] for layer in range(model.config.num_layers)]
