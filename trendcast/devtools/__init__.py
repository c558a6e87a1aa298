"""The developer/ops toolkit on top of both halves: embedded services, ``up``, ``replay``,
``tail``."""
