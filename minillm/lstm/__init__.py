"""LSTM hidden-state pruning and dynamic sparse training (the secondary LSTM module, issue 7).

* :mod:`model`, :mod:`data`, :mod:`train` — a word-level LSTM LM on PTB-format corpora;
* :mod:`groups`, :mod:`plan`, :mod:`surgery` — which weights a hidden unit owns, which units to keep,
  and their physical removal from ``nn.LSTM`` (all four gates, recurrent and consumer columns);
* :mod:`criteria` — hidden-unit scores (magnitude, group lasso, activation, FMS/SPSA, random);
* :mod:`dst_math`, :mod:`dst` — Dynamic Sparse Training's masked Linear / Conv2d / LSTM layers;
* :mod:`api`, :mod:`cli` — ``minillm lstm train|prune|eval``.

Nothing is imported here, so ``import minillm.lstm`` is free.
"""
