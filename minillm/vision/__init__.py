"""Secondary module: structured channel pruning of CNNs (``minillm cnn train|prune|eval``).

Layout, in the order data flows: ``models`` (ResNet/VGG from a JSON spec) → ``data`` → ``train`` →
``groups`` (coupled channels, from Torch-Pruning's dependency graph) → ``masks`` → ``criteria/`` (one
file per criterion, IFSO among them) → ``flops`` → ``plan`` (global ranking under a FLOPs/params target)
→ ``surgery`` → ``export``. ``api`` strings them together; ``cli`` only parses and prints.
"""
