"""The fault-injection suite: Redis, nodes, replicas and checkers broken on purpose under load;
each test asserts what clients saw, that no lease or DistServe session leaked, and what the
metrics and ``/ready`` said (marker ``faults``)."""
